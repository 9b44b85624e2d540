"""Build the small ELF fixtures from kfixture.c (gcc -g, then pahole -J for .BTF).

relocatable(): kfixture.o: sections at address 0, so `.data..percpu` symbols are
    offsets (the Linux <= 6.x "section-relative" per-CPU style).
linked("absolute"): linked at 0xffffffff81000000, `.data..percpu` at a real address
    (the Linux 7.x per-CPU style); linked("relative"): the same but `.data..percpu`
    linked at 0 (Linux <= 6.x).
Both are built once per session into a temporary directory.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "kfixture.c"
LINK_ADDR = 0xFFFFFFFF81000000
_built: dict[str, Path] = {}
_tmp: Path | None = None


def missing_tools() -> str | None:
    for tool in ("gcc", "ld", "pahole"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def _dir() -> Path:
    global _tmp
    if _tmp is None:
        _tmp = Path(tempfile.mkdtemp(prefix="vmm-kfixture-"))
    return _tmp


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def relocatable() -> Path:
    if "o" not in _built:
        out = _dir() / "kfixture.o"
        _run("gcc", "-g", "-O0", "-fno-pic", "-mcmodel=kernel", "-fno-asynchronous-unwind-tables",
             "-c", str(SOURCE), "-o", str(out))
        _run("pahole", "-J", str(out))
        _built["o"] = out
    return _built["o"]


def linked(style: str = "absolute") -> Path:
    """style 'absolute' (Linux 7.x per-CPU symbols) or 'relative' (Linux <= 6.x)."""
    key = f"elf-{style}"
    if key not in _built:
        obj = _dir() / "kfixture-link.o"
        _run("gcc", "-g", "-O0", "-fno-pic", "-mcmodel=kernel", "-fno-asynchronous-unwind-tables",
             "-c", str(SOURCE), "-o", str(obj))
        out = _dir() / f"kfixture-{style}.elf"
        script = HERE / ("kfixture.ld" if style == "absolute" else "kfixture-relative.ld")
        _run("ld", "-static", "-nostdlib", "--build-id=sha1", "-T", str(script),
             "-o", str(out), str(obj))
        _run("pahole", "-J", str(out))
        _built[key] = out
    return _built[key]


def pahole(path: Path, type_name: str) -> str:
    return subprocess.run(["pahole", "-F", "btf", "-C", type_name, str(path)],
                          check=True, capture_output=True, text=True).stdout


class FakeMemory:
    """Guest-physical memory as sparse 4 KiB pages in a dict: the `read(gpa, n)`
    interface of GuestMemory, for tests that need no VM. Unbacked pages raise
    GuestMemoryError like GuestMemory does for addresses outside RAM."""

    PAGE = 0x1000

    def __init__(self):
        self.pages: dict[int, bytearray] = {}

    def write(self, gpa: int, data: bytes) -> None:
        for i in range(0, len(data)):
            page = self.pages.setdefault((gpa + i) // self.PAGE, bytearray(self.PAGE))
            page[(gpa + i) % self.PAGE] = data[i]

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & (1 << 64) - 1).to_bytes(8, "little"))

    def read(self, gpa: int, n: int) -> bytes:
        from vmm.errors import GuestMemoryError

        out = bytearray()
        for a in range(gpa, gpa + n):
            page = self.pages.get(a // self.PAGE)
            if page is None:
                raise GuestMemoryError(f"gpa {a:#x} outside guest RAM")
            out.append(page[a % self.PAGE])
        return bytes(out)


class FakeLive:
    """What the kernel-state readers (vmm.kernel.scx_state, bpf_maps) need of a
    LiveKernel: .kernel, symbol_address, read_kva, over a sparse FakeMemory addressed by
    kernel virtual address (slide 0). ``on_read(kva, n)`` runs before each read (tests
    change memory under the reader with it); ``reads`` counts them."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.mem = FakeMemory()
        self.on_read = None
        self.reads = 0

    def symbol_address(self, name):
        return self.kernel.symbols.address(name)

    def read_kva(self, kva, n):
        self.reads += 1
        if self.on_read is not None:
            self.on_read(kva, n)
        return self.mem.read(kva, n)

    def put(self, kva, data):
        self.mem.write(kva, data)

    def u32(self, kva, v):
        self.put(kva, (v & 0xFFFFFFFF).to_bytes(4, "little"))

    def u64(self, kva, v):
        self.put(kva, (v & (1 << 64) - 1).to_bytes(8, "little"))


def load_image(mem: FakeMemory, elf_path: Path, slide: int = 0, phys_base: int = 0) -> None:
    """Copy the ELF's allocated sections where a booted kernel would have them:
    gpa = va + slide - __START_KERNEL_map + phys_base (per-CPU sections at 0 skipped)."""
    from vmm.kernel.elf import SHF_ALLOC, SHT_NOBITS, ElfImage

    img = ElfImage(elf_path)
    for s in img.sections:
        if not s.flags & SHF_ALLOC or s.addr < 0xFFFFFFFF80000000:
            continue
        data = b"\0" * s.size if s.type == SHT_NOBITS else img.section_data(s)
        mem.write((s.addr + slide - 0xFFFFFFFF80000000 + phys_base) & ((1 << 64) - 1), data)
    img.close()
