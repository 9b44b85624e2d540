"""A table resolver standing in for the kernel's symbol and BTF lookups, and a counting
rendezvous standing in for the freeze: the batch tests need no kernel and no VM."""

from contextlib import contextmanager

from vmm.errors import SymbolNotFound
from vmm.ops.targets import Location

FLAGS, NR_IMMED, CLOCK, MISALIGNED, NAME = 0x1000, 0x1004, 0x1008, 0x2001, 0x3000


class TableResolver:
    """name[/cpu].path -> (gpa, size, type) from a dict, like BTF would give."""

    table = {
        ("runqueues", 0, "scx.flags"): (FLAGS, 4, "u32"),
        ("runqueues", 0, "scx.nr_immed"): (NR_IMMED, 4, "u32"),
        ("runqueues", 0, "scx.clock"): (CLOCK, 8, "u64"),
        ("probe", None, "value"): (MISALIGNED, 8, "u64"),
        ("init_uts_ns", None, "name.nodename"): (NAME, 65, "char[65]"),
        ("packed", None, "bits"): (0x4000, 4, "u32:3"),
    }

    def locate_symbol(self, name, path, cpu, type=None):
        try:
            gpa, size, typ = self.table[(name, cpu, path)]
        except KeyError:
            raise SymbolNotFound(f"unknown symbol {name!r}") from None
        bits = 3 if typ.endswith(":3") else None
        return Location(gpa, size, f"{name}.{path}", type_name=typ, bit_size=bits)

    def locate_kva(self, kva, size):
        return Location(kva - 0xffffffff80000000, size, f"kva {kva:#x}")

    def locate_gpa(self, gpa, size):
        return Location(gpa, size, f"gpa {gpa:#x}")


class Rendezvous:
    def __init__(self):
        self.count = 0
        self.held = False

    @contextmanager
    def __call__(self):
        self.count += 1
        self.held = True
        try:
            yield "snapshot"
        finally:
            self.held = False
