"""ELF vmcore writer: the layout the kernel's own kdump (/proc/vmcore) gives, streamed.

    ELF64 header (ET_CORE, EM_X86_64)
    program headers: PT_NOTE first (crash reads the notes from the first segment),
                     then one PT_LOAD for the kernel image (vaddr = its runtime
                     address, as kdump writes it: crash derives phys_base from it),
                     then one PT_LOAD per RAM region (paddr = guest-physical address,
                     vaddr = its direct-map address), p_align 0 as in kdump's
    notes:           one NT_PRSTATUS ("CORE") per vCPU, registers from the freeze
                     snapshot, then "VMCOREINFO" (type 0)
    data:            each PT_LOAD's bytes at a page-aligned file offset

Guest RAM is copied to the file in chunks straight from guest memory (no second copy
of the RAM in host memory); all-zero chunks become file holes (they read back as
zeros, nothing is left out). Every region of guest RAM is written; the report says
how many bytes and how many of them were holes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Optional, Sequence

from vmm.errors import VmmError
from vmm.hostio import atomic_output

ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_CORE, EM_X86_64 = 4, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS = 1
EHDR_SIZE, PHDR_SIZE = 64, 56
PAGE = 4096
CHUNK = 1 << 20  # bytes per copy from guest memory

# struct user_regs_struct (x86-64), the order of elf_gregset_t.
GREGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
         "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
         "gs_base", "ds", "es", "fs", "gs")
PRSTATUS_SIZE = 336  # struct elf_prstatus on x86-64
PRSTATUS_PID_OFFSET = 32
PRSTATUS_REG_OFFSET = 112


class VmcoreError(VmmError):
    """A vmcore could not be written (names the step); the partial file is removed."""


@dataclass
class PrStatus:
    """One vCPU's registers for its NT_PRSTATUS note (names as in GREGS)."""

    cpu: int
    regs: dict[str, int]
    pid: int = 0  # the task running on that CPU (the kernel writes current->pid)

    def pack(self) -> bytes:
        buf = bytearray(PRSTATUS_SIZE)
        struct.pack_into("<i", buf, PRSTATUS_PID_OFFSET, self.pid)
        struct.pack_into("<27Q", buf, PRSTATUS_REG_OFFSET,
                         *(self.regs.get(r, 0) & (2**64 - 1) for r in GREGS))
        return bytes(buf)

    @staticmethod
    def unpack(cpu: int, data: bytes) -> "PrStatus":
        pid = struct.unpack_from("<i", data, PRSTATUS_PID_OFFSET)[0]
        values = struct.unpack_from("<27Q", data, PRSTATUS_REG_OFFSET)
        return PrStatus(cpu, dict(zip(GREGS, values)), pid)


def prstatus_from_snapshot(vcpu_snapshot: Any, pid: int = 0) -> PrStatus:
    """PrStatus from a vmm.runtime VcpuSnapshot (cffi kvm_regs / kvm_sregs)."""
    r, s = vcpu_snapshot.regs, vcpu_snapshot.sregs
    regs = {name: getattr(r, name) for name in
            ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
             "rcx", "rdx", "rsi", "rdi", "rip", "rsp")}
    regs.update(orig_rax=2**64 - 1, eflags=r.rflags, cs=s.cs.selector, ss=s.ss.selector,
                ds=s.ds.selector, es=s.es.selector, fs=s.fs.selector, gs=s.gs.selector,
                fs_base=s.fs.base, gs_base=s.gs.base)
    return PrStatus(vcpu_snapshot.index, regs, pid)


@dataclass
class Segment:
    """One PT_LOAD: ``size`` bytes of guest RAM at guest-physical ``paddr``."""

    paddr: int
    vaddr: int
    size: int
    what: str = ""
    offset: int = 0  # file offset, set by the layout


@dataclass
class VmcoreReport:
    path: str
    size: int  # file size
    segments: list[Segment]
    ram_bytes: int  # guest RAM bytes written, every PT_LOAD (RAM regions + the image alias)
    hole_bytes: int  # of the written bytes, all-zero chunks left as file holes
    cpus: int
    vmcoreinfo: str = field(repr=False, default="")

    def describe(self) -> str:
        return (f"wrote {self.path}: {self.size} bytes, {len(self.segments)} PT_LOAD segments "
                f"({self.ram_bytes} bytes of guest RAM, {self.hole_bytes} of them zero pages "
                f"left as file holes), {self.cpus} NT_PRSTATUS notes, VMCOREINFO "
                f"{len(self.vmcoreinfo)} bytes")


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note: name NUL-terminated, name and desc each padded to 4 bytes."""
    name0 = name + b"\0"
    return (struct.pack("<III", len(name0), len(desc), ntype)
            + name0 + b"\0" * (-len(name0) % 4) + desc + b"\0" * (-len(desc) % 4))


def notes_blob(cpus: Sequence[PrStatus], vmcoreinfo: bytes) -> bytes:
    return b"".join(note(b"CORE", NT_PRSTATUS, c.pack()) for c in cpus) + \
        note(b"VMCOREINFO", 0, vmcoreinfo)


def layout(segments: list[Segment], notes_size: int) -> tuple[bytes, int]:
    """(ELF header + program headers, notes file offset); sets each segment's offset."""
    phnum = 1 + len(segments)
    notes_off = EHDR_SIZE + PHDR_SIZE * phnum
    off = _align(notes_off + notes_size, PAGE)
    for seg in segments:
        seg.offset = off
        off = _align(off + seg.size, PAGE)
    ident = b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT]) + b"\0" * 9
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", ET_CORE, EM_X86_64, EV_CURRENT, 0,
                               EHDR_SIZE, 0, 0, EHDR_SIZE, PHDR_SIZE, phnum, 0, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", PT_NOTE, 0, notes_off, 0, 0, notes_size, notes_size, 0)
    for seg in segments:
        # p_align 0, as the kernel's own /proc/vmcore has it: crash tells a kdump vmcore
        # (whose VMCOREINFO it honours: KERNELOFFSET, phys_base) from an old netdump
        # one by exactly that (or by an unaligned first p_offset).
        phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, PF_R | PF_W | PF_X, seg.offset,
                             seg.vaddr, seg.paddr, seg.size, seg.size, 0)
    return ehdr + phdrs, notes_off


def write(path: str, memory: Any, segments: list[Segment], cpus: Sequence[PrStatus],
          vmcoreinfo: bytes, chunk: int = CHUNK) -> VmcoreReport:
    """Write the vmcore to ``path``. ``memory``: anything with read(gpa, n) -> bytes.

    Each segment's bytes are read from guest memory ``chunk`` bytes at a time and
    written at once; a failure removes the partial file and names the segment.
    """
    blob = notes_blob(cpus, vmcoreinfo)
    headers, notes_off = layout(segments, len(blob))
    zero = bytes(chunk)
    ram = holes = 0
    try:
        # Whole or not at all (a kill mid-write leaves at most a dot-temporary beside
        # it, swept by the next dump), and readable by its owner only: guest memory.
        with atomic_output(path, private=True) as f:
            f.write(headers)
            f.seek(notes_off)
            f.write(blob)
            for seg in segments:
                done = 0
                while done < seg.size:
                    n = min(chunk, seg.size - done)
                    try:
                        data = memory.read(seg.paddr + done, n)
                    except VmmError as exc:
                        raise VmcoreError(f"reading {seg.what or 'segment'} at gpa "
                                          f"{seg.paddr + done:#x} (+{n:#x}): {exc}") from exc
                    if data == (zero if n == chunk else bytes(n)):
                        holes += n
                    else:
                        f.seek(seg.offset + done)
                        f.write(data)
                    done += n
                ram += seg.size
            end = max([s.offset + s.size for s in segments] + [notes_off + len(blob)])
            f.truncate(end)
    except OSError as exc:
        raise VmcoreError(f"writing the vmcore {path}: {exc}") from exc
    return VmcoreReport(path=str(path), size=end, segments=segments, ram_bytes=ram,
                        hole_bytes=holes, cpus=len(cpus), vmcoreinfo=vmcoreinfo.decode())


def read_headers(f: BinaryIO) -> tuple[list[tuple], list[tuple[bytes, int, bytes]]]:
    """(program headers, notes) of an ELF vmcore: for tests and `vmm dump --check`.

    Program headers as (type, flags, offset, vaddr, paddr, filesz, memsz, align);
    notes as (name, type, desc) from the PT_NOTE segment."""
    f.seek(0)
    ehdr = f.read(EHDR_SIZE)
    if ehdr[:4] != b"\x7fELF" or ehdr[4] != ELFCLASS64:
        raise VmcoreError("not an ELF64 file")
    (e_type, e_machine, _, _, e_phoff, _, _, _, e_phentsize, e_phnum, _, _, _) = \
        struct.unpack_from("<HHIQQQIHHHHHH", ehdr, 16)
    if e_type != ET_CORE or e_machine != EM_X86_64:
        raise VmcoreError(f"not an x86-64 core file (e_type {e_type}, e_machine {e_machine})")
    f.seek(e_phoff)
    raw = f.read(e_phentsize * e_phnum)
    phdrs = [struct.unpack_from("<IIQQQQQQ", raw, i * e_phentsize) for i in range(e_phnum)]
    notes = []
    for ph in phdrs:
        if ph[0] != PT_NOTE:
            continue
        f.seek(ph[2])
        data = f.read(ph[5])
        p = 0
        while p + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, p)
            p += 12
            name = data[p:p + namesz].rstrip(b"\0")
            p += _align(namesz, 4)
            notes.append((name, ntype, data[p:p + descsz]))
            p += _align(descsz, 4)
    return phdrs, notes


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def ram_segments(regions: Iterable[tuple], page_offset: int) -> list[Segment]:
    """One Segment per guest RAM region ((gpa, size, ...) tuples, GuestMemory.regions)."""
    return [Segment(r[0], (page_offset + r[0]) & (2**64 - 1), r[1],
                    f"RAM [{r[0]:#x}, {r[0] + r[1]:#x})") for r in regions]


def image_segment(live: Any) -> Optional[Segment]:
    """The kernel image as kdump describes it: _text.._end at its runtime address."""
    text, end = live.symbols.get("_text"), live.symbols.get("_end")
    if text is None or end is None or end.address <= text.address:
        return None
    va = (text.address + live.slide) & (2**64 - 1)
    return Segment(live.kva_to_gpa(va), va, _align(end.address - text.address, PAGE),
                   "kernel image")
