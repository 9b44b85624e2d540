"""KASLR virtual slide: how far the running kernel image moved from its link address.

Primary source: MSR_LSTAR holds the runtime address of entry_SYSCALL_64 once the
kernel has run syscall_init(); slide = LSTAR - link address. It is cross-checked
with what is available: the IDT base from the vCPU's sregs against idt_table (when
the IDT lies in the image map; see check_idt), and
the bytes of `linux_banner` read from guest memory at the slid address against the
vmlinux file. With nokaslr (or a kernel booted as an ELF, never relocated) it is 0.
"""

from __future__ import annotations

from typing import NamedTuple

from vmm.errors import TranslationError, VmmError

SLIDE_ALIGN = 0x200000  # CONFIG_PHYSICAL_ALIGN: the decompressor moves the image in 2 MiB steps
MAX_SLIDE = 1 << 30  # KERNEL_IMAGE_SIZE with KASLR
MASK64 = (1 << 64) - 1


class Slide(NamedTuple):
    value: int
    source: str  # "given", "lstar", "default"
    checks: tuple[str, ...]  # what agreed with it


def slide_from_lstar(symbols, lstar: int) -> int:
    link = symbols.address("entry_SYSCALL_64")
    slide = (lstar - link) & MASK64
    if slide >= 1 << 63:
        slide -= 1 << 64
    if not 0 <= slide < MAX_SLIDE or slide % SLIDE_ALIGN:
        raise TranslationError(
            f"MSR_LSTAR {lstar:#x} is not entry_SYSCALL_64 ({link:#x}) moved by a 2 MiB-aligned "
            f"KASLR slide below 1 GiB (difference {slide:#x}): is syscall_init() done, and is "
            f"this the vmlinux the guest runs?")
    return slide


IDT_SYMBOLS = ("idt_table", "bringup_idt_table")  # runtime IDT; early-boot IDT
IMAGE_MAP_START = 0xFFFFFFFF80000000


def check_idt(symbols, slide: int, idt_base: int) -> str | None | bool:
    """True when the IDT base is an IDT symbol moved by `slide`; None when it cannot
    tell; else a description of the disagreement.

    A booted x86-64 kernel loads its IDT through the read-only cpu_entry_area alias
    (0xfffffe0000000000) and early boot uses the VMM's own table: only an IDT base
    inside the kernel image map says anything about the slide.
    """
    if not idt_base or not IMAGE_MAP_START <= idt_base < IMAGE_MAP_START + MAX_SLIDE * 2:
        return None
    for name in IDT_SYMBOLS:
        sym = symbols.get(name)
        if sym is None:
            continue
        if (sym.address + slide) & MASK64 == idt_base:
            return True
        implied = (idt_base - sym.address) & MASK64
        if implied < MAX_SLIDE and implied % SLIDE_ALIGN == 0:
            return (f"IDT base {idt_base:#x} is {name} ({sym.address:#x}) moved by "
                    f"{implied:#x}, not by {slide:#x}")
    return None


def check_banner(kernel, read_kva, slide: int) -> bool | None:
    """Compare linux_banner in guest memory with the vmlinux file.

    True: match; False: mismatch; None: cannot check (no file contents, not mapped).
    """
    sym = kernel.symbols.get("linux_banner")
    if sym is None or kernel.elf is None:
        return None
    n = sym.size if 0 < sym.size < 48 else 48
    expected = kernel.elf.read_va(sym.address, n)
    if not expected:
        return None
    try:
        actual = read_kva(sym.address + slide, len(expected))
    except VmmError:
        return None
    return actual == expected


def choose_slide(kernel, kaslr_slide=None, lstar=None) -> tuple[int, str]:
    """(slide, source): given > from LSTAR > 0. Checked afterwards by verify_slide."""
    if kaslr_slide is not None:
        return int(kaslr_slide), "given"
    if lstar and "entry_SYSCALL_64" in kernel.symbols:
        return slide_from_lstar(kernel.symbols, lstar), "lstar"
    return 0, "default"


def verify_slide(kernel, read_kva, value: int, source: str, idt_base=None) -> Slide:
    """Cross-check a slide; TranslationError when a second source disagrees."""
    symbols = kernel.symbols
    checks: list[str] = []
    idt = check_idt(symbols, value, idt_base) if idt_base else None
    if isinstance(idt, str):
        raise TranslationError(f"KASLR slide {value:#x} (from {source}) disagrees: {idt}")
    if idt:
        checks.append("idt")
    banner = check_banner(kernel, read_kva, value)
    if banner is False:
        raise TranslationError(
            f"KASLR slide {value:#x} (from {source}): linux_banner in guest memory differs from "
            f"the vmlinux file: wrong slide, or not the kernel the guest runs"
            + ("" if source != "default" else " (pass lstar= from a frozen vCPU)"))
    if banner:
        checks.append("linux_banner")
    return Slide(value, source, tuple(checks))
