"""KASLR: where the running kernel put itself, found from a frozen guest.

A kernel booted through its own decompressor with CONFIG_RANDOMIZE_BASE moves twice,
independently: its image virtually (the *slide*, 2 MiB steps below 1 GiB) and
physically (*phys_base*: image gpa = va - __START_KERNEL_map + phys_base). With
CONFIG_RANDOMIZE_MEMORY it also moves the direct map, vmalloc and vmemmap bases
(`page_offset_base`, `vmalloc_base`, `vmemmap_base`, variables in the image).

- The slide: MSR_LSTAR holds the runtime address of entry_SYSCALL_64 once the kernel
  has run syscall_init(); slide = LSTAR - link address. Cross-checked with the IDT base
  (when the IDT lies in the image map; see check_idt) and with the bytes of
  `linux_banner` read from guest memory at the slid address against the vmlinux file.
- phys_base: the variable `phys_base`, read where a page walk from CR3 says it is;
  the value must equal what the walk itself implies (phys_base_from_walk).
- The bases: read from the image, checked for order and alignment (check_bases), and
  a page of the image must translate to the same gpa through the direct map.
With nokaslr (or a kernel booted as an ELF, never relocated) slide and phys_base are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from vmm.arch.x86.regs import MASK64
from vmm.errors import TranslationError, VmmError
from vmm.kernel.translate import START_KERNEL_MAP

SLIDE_ALIGN = 0x200000  # CONFIG_PHYSICAL_ALIGN: the decompressor moves the image in 2 MiB steps
MAX_SLIDE = 1 << 30  # KERNEL_IMAGE_SIZE with KASLR
PUD_SIZE = 1 << 30  # kernel_randomize_memory() moves each region in 1 GiB steps


class Slide(NamedTuple):
    """A KASLR slide, where it came from and what agreed with it."""

    value: int
    source: str  # "given", "lstar", "default"
    checks: tuple[str, ...]  # what agreed with it


def slide_from_lstar(symbols, lstar: int) -> int:
    """The slide that moves entry_SYSCALL_64 to MSR_LSTAR; TranslationError when it is no valid
    KASLR slide."""
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
IMAGE_MAP_START = START_KERNEL_MAP  # the kernel image's mapping


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


# --- physical placement and the randomized memory regions --------------------------------------
def signed64(value: int) -> int:
    """value as a signed 64-bit integer."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def phys_base_from_walk(va: int, gpa: int) -> int:
    """The phys_base that maps image address `va` to `gpa` (va - __START_KERNEL_map +
    phys_base = gpa), as a 64-bit value like the kernel's unsigned long."""
    return (gpa - (va - START_KERNEL_MAP)) & MASK64


def check_phys_base(value: int, va: int, walked_gpa: int) -> None:
    """TranslationError unless the phys_base variable (read at walked_gpa, the page
    walk's translation of its own address va) agrees with that walk."""
    implied = phys_base_from_walk(va, walked_gpa)
    if value != implied:
        raise TranslationError(
            f"phys_base reads {value:#x}, but the page tables map the image with phys_base "
            f"{implied:#x} (phys_base at kva {va:#x} -> gpa {walked_gpa:#x}): wrong slide, "
            f"or not the kernel the guest runs")


def check_bases(page_offset_base: int, vmalloc_base: int | None, vmemmap_base: int | None,
                defaults: tuple[int, int, int]) -> None:
    """TranslationError when the bases read from guest memory cannot be the kernel's:
    kernel_randomize_memory() keeps the order direct map < vmalloc < vmemmap, each
    1 GiB-aligned, all in the upper half below the kernel image map."""
    named = [("page_offset_base", page_offset_base), ("vmalloc_base", vmalloc_base),
             ("vmemmap_base", vmemmap_base)]
    present = [(n, v) for n, v in named if v is not None]
    for (name, value), default in zip(named, defaults):
        if value is None or value == default:
            continue
        if value % PUD_SIZE or not 1 << 63 <= value < START_KERNEL_MAP:
            raise TranslationError(f"{name} reads {value:#x}: not a 1 GiB-aligned kernel address "
                                   f"(wrong slide or phys_base?)")
    for (n1, v1), (n2, v2) in zip(present, present[1:]):
        if not v1 < v2:
            raise TranslationError(f"{n1} {v1:#x} is not below {n2} {v2:#x}: the kernel keeps "
                                   f"them in that order (wrong slide or phys_base?)")


@dataclass(frozen=True)
class KernelLayout:
    """Where the running kernel is: what LiveKernel found, and what agreed with it."""

    slide: int
    slide_source: str  # "lstar", "given", "default"
    phys_base: int  # as the kernel's unsigned long
    phys_base_source: str  # "page walk", "link address", "given slide only"...
    image_gpa: int  # guest-physical address of _text
    page_offset_base: int
    vmalloc_base: int | None
    vmemmap_base: int | None
    defaults: tuple[int, int, int]  # the bases without RANDOMIZE_MEMORY
    checks: tuple[str, ...]

    @property
    def image_randomized(self) -> bool:
        """True when the kernel image moved (a slide, or loaded away from LOAD_PHYSICAL_ADDR)."""
        return self.slide != 0 or self.image_gpa != LOAD_PHYSICAL_ADDR

    @property
    def memory_randomized(self) -> bool:
        """True when a direct-map, vmalloc or vmemmap base differs from its default."""
        return any(v is not None and v != d for v, d in
                   zip((self.page_offset_base, self.vmalloc_base, self.vmemmap_base),
                       self.defaults))

    def describe(self) -> str:
        """The layout in one line (slide, physical base, randomized bases)."""
        bases = ", ".join(f"{n} {v:#x}" for n, v in (
            ("page_offset_base", self.page_offset_base), ("vmalloc_base", self.vmalloc_base),
            ("vmemmap_base", self.vmemmap_base)) if v is not None)
        return (f"KASLR slide {self.slide:#x} (from {self.slide_source}), kernel image at gpa "
                f"{self.image_gpa:#x} (phys_base {signed64(self.phys_base):#x} from "
                f"{self.phys_base_source}); {bases} "
                f"({'randomized' if self.memory_randomized else 'default'}); "
                f"checked: {', '.join(self.checks) or 'nothing'}")

    def as_dict(self) -> dict:
        """The layout as plain data (for --json)."""
        return {"slide": self.slide, "slide_source": self.slide_source,
                "phys_base": self.phys_base, "phys_base_source": self.phys_base_source,
                "image_gpa": self.image_gpa, "page_offset_base": self.page_offset_base,
                "vmalloc_base": self.vmalloc_base, "vmemmap_base": self.vmemmap_base,
                "image_randomized": self.image_randomized,
                "memory_randomized": self.memory_randomized, "checks": list(self.checks)}


LOAD_PHYSICAL_ADDR = 0x1000000  # CONFIG_PHYSICAL_START: where an unmoved image sits
