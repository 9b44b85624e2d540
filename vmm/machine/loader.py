"""Writing a kernel image and an initrd into guest memory.

`load_kernel` returns what it loaded (a LoadedKernel: entry point, end, the parsed
image), the way a loader reports its result to the builder; nothing here keeps state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmm.errors import ImageError
from vmm.image import bootparams as bp
from vmm.image import formats as images
from vmm.machine import layout as L


@dataclass(frozen=True)
class LoadedKernel:
    """What load_kernel wrote into guest memory: entry point, end, whether it is Linux, and the
    parsed image."""

    entry: int  # where the boot vCPU starts
    kernel_end: int  # first byte past the kernel (the initrd goes above)
    is_linux: bool
    image: bytes | str  # the image as read (the bzImage when one was given), or the path
    # of an ELF file of which only the headers and loaded segments were read
    elf: images.ElfKernel | None  # the ELF that was loaded (None: the bzImage boots itself)
    bzimage: images.BzImage | None  # the bzImage given, if one was


def load_kernel(memory: Any, memory_size: int, kernel: Any, decompress_in_guest: bool) -> LoadedKernel:
    """Reads `kernel` (a path or bytes) and writes it into `memory`. A bzImage boots
    through its own decompressor when `decompress_in_guest`, else its vmlinux is
    extracted on the host and loaded as an ELF."""
    if isinstance(kernel, (bytes, bytearray, memoryview)):
        data = images.read_image(kernel)
    else:
        with images.map_image(kernel) as mapped:
            if mapped[:4] == images.ELF_MAGIC:
                # Only the headers and the loaded segments are read (~10 of a vmlinux's
                # 80+ MB with DWARF: 184 -> 10 ms of a start on PVM).
                elf = _load_elf(memory, memory_size, images.parse_elf_kernel(mapped))
                return LoadedKernel(elf.entry, elf.end, elf.is_linux, os.fspath(kernel), elf, None)
            data = bytes(mapped)  # a bzImage is written (or decompressed) whole
    image = data
    bz = None
    if images.detect_kernel_format(data) == "bzimage":
        bz = images.parse_bzimage(data)
        if decompress_in_guest:
            entry, end = _load_bzimage_protected_mode(memory, memory_size, bz)
            return LoadedKernel(entry, end, True, image, None, bz)
        # On PVM hosts (the automatic choice there) decompress on the host and boot the
        # vmlinux inside: the guest's own decompressor would run in emulated ring 0
        # (~5000x slower) and its zstd decoder uses BMI2, which the emulator cannot
        # execute. The vmlinux then runs where it was linked: no KASLR.
        data = images.extract_vmlinux(data)
    elf = _load_elf(memory, memory_size, images.parse_elf_kernel(data))
    return LoadedKernel(elf.entry, elf.end, bz is not None or elf.is_linux, image, elf, bz)


def _load_elf(memory: Any, memory_size: int, elf: images.ElfKernel) -> images.ElfKernel:
    """Writes the ELF's loadable segments where they are linked (physically)."""
    for seg in elf.segments:
        if seg.paddr < L.HIMEM_START:
            raise ImageError(f"kernel segment at {seg.paddr:#x} would overwrite the boot "
                             f"structures below 1 MiB")
        if not memory.contains(seg.paddr, seg.memsz):
            raise ImageError(f"kernel segment [{seg.paddr:#x}, {seg.paddr + seg.memsz:#x}) "
                             f"does not fit in {memory_size >> 20} MiB of RAM")
        # Guest RAM is a fresh anonymous mapping: the bss part is already zero.
        memory.write(seg.paddr, seg.data)
    return elf


def _load_bzimage_protected_mode(memory: Any, memory_size: int, bz: images.BzImage) -> tuple[int, int]:
    """Boot through the bzImage's own decompressor via its 64-bit entry (startup_64 at
    load address + 0x200), as boot.rst's 64-bit boot protocol describes."""
    if not bz.xloadflags & bp.XLF_KERNEL_64:
        raise ImageError("this bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")
    load = L.BZIMAGE_LOAD_START if bz.relocatable else (bz.pref_address or L.BZIMAGE_LOAD_START)
    code = bz.protected_mode_code
    # The decompressor works in [pref_address, pref_address + init_size).
    end = max(load + len(code), (bz.pref_address or load) + bz.init_size)
    if not memory.contains(load, end - load):
        raise ImageError(f"bzImage needs [{load:#x}, {end:#x}) but the guest has "
                         f"{memory_size >> 20} MiB of RAM")
    memory.write(load, code)
    return load + 0x200, end


def load_initrd(memory: Any, memory_size: int, initrd: Any, kernel_end: int,
                bzimage: images.BzImage | None) -> tuple[int, int]:
    """Writes `initrd` (a path or bytes) above the kernel, under the highest address the
    kernel accepts; returns (guest-physical address, size)."""
    data = initrd
    if not isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read initrd {initrd}: {e.strerror}") from None
    if not data:
        raise ImageError("the initrd is empty")
    limit = bzimage.initrd_addr_max if bzimage else L.DEFAULT_INITRD_ADDR_MAX
    addr = L.initrd_address(memory_size, len(data), kernel_end, limit)
    memory.write(addr, bytes(data))
    return addr, len(data)
