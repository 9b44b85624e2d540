"""One fuzzing target per parser of untrusted input.

Each target takes bytes and must either return or raise a VmmError subclass: anything
else (IndexError, struct.error, RecursionError, MemoryError, a hang) is a bug. Used by
fuzz/run.py (atheris, coverage-guided, when installed; a mutation loop otherwise) and by
tests/test_fuzz_regressions.py, which replays the seed corpus and every input a fuzzing
run found (fuzz/regressions/<target>/).
"""

from __future__ import annotations

import struct

from vmm.errors import VmmError


def _btf(data: bytes) -> None:
    from vmm.kernel.btf import STRUCT, UNION, Btf

    btf = Btf(data)
    for tid in range(1, min(len(btf), 4096)):
        t = btf.get(tid)
        for call in (lambda: btf.type_name(t), lambda: btf.sizeof(t),
                     lambda: btf.format_type(t) if t.kind in (STRUCT, UNION) else None,
                     lambda: btf.member_names(btf.resolve(t)) if t.kind in (STRUCT, UNION) else None,
                     lambda: btf.field(t, "x") if t.kind in (STRUCT, UNION) else None):
            try:
                call()
            except VmmError:
                pass
    for name in ("runqueues", "scx_rq", "SCX_RQ_CLK_VALID"):
        try:
            btf.type(name)
        except VmmError:
            pass
        try:
            btf.enum_value(name)
        except VmmError:
            pass


def _elf(data: bytes) -> None:
    from vmm.kernel.elf import ElfImage
    from vmm.kernel.symbols import SymbolTable

    img = ElfImage(data)
    img.build_id()
    table = SymbolTable(img.symbols())
    for s in list(table)[:8]:
        table.nearest(s.address)
    blob = img.btf()
    if blob:
        _btf(blob)


def _kernel_elf(data: bytes) -> None:
    from vmm.image.formats import parse_elf_kernel

    parse_elf_kernel(data)


def _sysmap(data: bytes) -> None:
    from vmm.kernel.symbols import SymbolTable
    from vmm.kernel.sysmap import parse_system_map

    table = SymbolTable(parse_system_map(data))
    for s in list(table)[:8]:
        table.nearest(s.address)


def _bzimage(data: bytes) -> None:
    from vmm.image.formats import extract_vmlinux, parse_bzimage

    parse_bzimage(data)
    extract_vmlinux(data)


def _cpio(data: bytes) -> None:
    from vmm.machine.initramfs import parse_newc

    parse_newc(data, max_size=64 << 20)


TARGETS = {
    "btf": _btf,
    "elf": _elf,
    "kernel_elf": _kernel_elf,
    "sysmap": _sysmap,
    "bzimage": _bzimage,
    "cpio": _cpio,
}


def run_one(target: str, data: bytes) -> None:
    """Feeds data to target; a VmmError is the expected refusal, anything else escapes."""
    try:
        TARGETS[target](data)
    except VmmError:
        pass


# -------------------------------------------------------------------- seed corpus
def make_seeds(guest_elf: bytes) -> dict[str, dict[str, bytes]]:
    """The checked-in seeds (fuzz/corpus/<target>/), from our test guest's ELF: small,
    real images. `python fuzz/run.py --make-seeds` rewrites them."""
    import gzip

    from fuzz.synthetic_images import make_bzimage, make_elf
    from vmm.kernel.elf import ElfImage
    from vmm.machine.initramfs import create_initramfs, file, symlink

    btf = ElfImage(guest_elf).btf()
    syms = ElfImage(guest_elf).symbols()
    sysmap = "".join(f"{s.address:016x} {s.type} {s.name}\n" for s in syms[:40]).encode()
    code = b"\xf4" * 64
    kernel = make_elf(code)
    return {
        "btf": {"guest.btf": btf},
        "elf": {"guest-small.elf": guest_elf},
        "kernel_elf": {"tiny.elf": kernel, "guest-small.elf": guest_elf},
        "sysmap": {"guest.map": sysmap},
        "bzimage": {"tiny-gzip.bzImage": make_bzimage(gzip.compress(kernel, 9)
                                                       + struct.pack("<I", len(kernel)))},
        "cpio": {"init.cpio.gz": create_initramfs([file("init", b"#!/bin/sh\n", 0o755),
                                                   symlink("sbin/init", "/init")]),
                 "init.cpio": create_initramfs([file("init", b"x" * 40, 0o755)],
                                               compress=False)},
    }
