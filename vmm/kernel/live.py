"""LiveKernel: a Kernel's symbols and types applied to a running guest's memory.

Needs only a reader with `read(gpa, n) -> bytes` (GuestMemory, or bytes in tests).

    live = kernel.attach(machine.memory, cr3=snap.vcpus[0].sregs.cr3,
                         lstar=snap.vcpus[0].msrs[MSR_LSTAR])
    live.read("runqueues", "scx.flags", cpu=1)      # -> int
    live.read("runqueues", "curr->pid", cpu=0)      # '->' follows a pointer in guest memory
    live.address_of("jiffies"), live.kva_to_gpa(kva)
"""

from __future__ import annotations

import copy
import struct

from vmm.arch.x86.regs import CR4_LA57, MASK64
from vmm.errors import (FieldPathError, KernelFeatureMissing, TargetError, TranslationError,
                        VmmError)
from vmm.kernel import kaslr, translate
from vmm.kernel.btf import ENUM, ENUM64, INT, PTR, Field, Type
from vmm.kernel.symbols import KERNEL_SPACE
from vmm.kernel.translate import START_KERNEL_MAP

DEFAULT_IMAGE_SIZE = 512 << 20  # KERNEL_IMAGE_SIZE without KASLR


class LiveKernel:
    """A Kernel applied to a running guest's memory: the KASLR slide, the randomized bases,
    per-CPU offsets, reads and resolution of symbols and fields."""

    def __init__(self, kernel, reader, cr3=None, kaslr_slide=None, lstar=None, cr4=None,
                 idt_base=None):
        self.kernel = kernel
        self.symbols = kernel.symbols
        self.reader = reader
        self.cr3 = cr3
        self.la57 = bool(cr4 is not None and cr4 & CR4_LA57)
        value, source = kaslr.choose_slide(kernel, kaslr_slide, lstar)
        self.slide = value
        self._image = self._image_range()
        # Until read from the image: the defaults, and no direct-map arithmetic.
        self.page_offset_base, self.vmalloc_base, self.vmemmap_base = self._defaults()
        self._direct_map_end = None
        self.phys_base, phys_source = self._find_phys_base()
        self.page_offset_base = self._read_base("page_offset_base", self._defaults()[0])
        self.vmalloc_base = self._read_base("vmalloc_base", self._defaults()[1])
        self.vmemmap_base = self._read_base("vmemmap_base", self._defaults()[2])
        kaslr.check_bases(self.page_offset_base, self.vmalloc_base, self.vmemmap_base,
                          self._defaults())
        self._direct_map_end = self._find_direct_map_end()
        self.kaslr = kaslr.verify_slide(kernel, self.read_kva, value, source, idt_base)
        checks = list(self.kaslr.checks)
        if phys_source == "page walk":
            checks.append("phys_base = page walk")
        if self._check_direct_map():
            checks.append("direct map = image map")
        self.layout = kaslr.KernelLayout(
            slide=value, slide_source=source, phys_base=self.phys_base,
            phys_base_source=phys_source, image_gpa=self.kva_to_gpa(self._image[0]),
            page_offset_base=self.page_offset_base,
            vmalloc_base=self.vmalloc_base if "vmalloc_base" in self.symbols else None,
            vmemmap_base=self.vmemmap_base if "vmemmap_base" in self.symbols else None,
            defaults=self._defaults(), checks=tuple(checks))

    # ------------------------------------------------------------ address spaces
    def _defaults(self) -> tuple[int, int, int]:
        if self.la57:
            return (translate.DEFAULT_PAGE_OFFSET_5L, translate.DEFAULT_VMALLOC_BASE_5L,
                    translate.DEFAULT_VMEMMAP_BASE_5L)
        return (translate.DEFAULT_PAGE_OFFSET_4L, translate.DEFAULT_VMALLOC_BASE_4L,
                translate.DEFAULT_VMEMMAP_BASE_4L)

    def _image_range(self) -> tuple[int, int]:
        start = self.symbols.get("_text")
        end = self.symbols.get("_end")
        lo = (start.address if start else START_KERNEL_MAP) + self.slide
        hi = end.address + self.slide if end else START_KERNEL_MAP + DEFAULT_IMAGE_SIZE
        return lo & MASK64, hi & MASK64

    def _read_u64_gpa(self, gpa: int) -> int:
        return struct.unpack("<Q", self.reader.read(gpa, 8))[0]

    def _walk(self, kva: int) -> int:
        return translate.walk_kernel(self.reader, self.cr3, kva, self.la57)

    def _find_phys_base(self) -> tuple[int, str]:
        """(phys_base, how it was found), read from guest memory.

        The kernel keeps it in the variable `phys_base`, whose physical address itself
        depends on phys_base. With CR3, walk the page tables to the variable and check
        that its value is what the walk implies. Without (or when the walk fails: early
        boot), try the values it has when the image was not moved physically (0 without
        a slide, -slide with one) and keep one the variable confirms; linux_banner is
        checked afterwards through the same translation.
        """
        sym = self.symbols.get("phys_base")
        guesses = [0] if self.slide == 0 else [(-self.slide) & MASK64, 0]
        if sym is None:
            return guesses[0], "no phys_base symbol: image assumed at its link address"
        va = (sym.address + self.slide) & MASK64
        walk_error = None
        if self.cr3 is not None:
            try:
                gpa = self._walk(va)
            except TranslationError as e:
                walk_error = e
            else:
                value = self._read_u64_gpa(gpa)
                kaslr.check_phys_base(value, va, gpa)
                return value, "page walk"
        for guess in guesses:
            try:
                if self._read_u64_gpa((va - START_KERNEL_MAP + guess) & MASK64) == guess:
                    return guess, "link address" if guess == (-self.slide) & MASK64 else "slide"
            except VmmError:
                continue
        if walk_error is not None:
            raise TranslationError(f"cannot find phys_base: the page walk to it failed "
                                   f"({walk_error}) and the image is not at its link address")
        raise TranslationError(
            f"cannot find phys_base: the kernel image is not where its link address puts it "
            f"(slide {self.slide:#x}); pass cr3= so the page tables can be walked")

    def _read_base(self, name: str, default: int) -> int:
        sym = self.symbols.get(name)
        if sym is None:
            return default
        value = struct.unpack("<Q", self.read_kva(sym.address + self.slide, 8))[0]
        return value or default  # 0 before the kernel set it: still the default

    def _find_direct_map_end(self) -> int:
        """End of the range translated by direct-map arithmetic: the architectural size,
        cut at the next randomized region (with RANDOMIZE_MEMORY the direct map is only
        as large as RAM plus padding, and vmalloc may follow within that size)."""
        span = translate.DIRECT_MAP_SIZE_5L if self.la57 else translate.DIRECT_MAP_SIZE_4L
        end = self.page_offset_base + span
        for base in (self.vmalloc_base, self.vmemmap_base):
            if self.page_offset_base < base < end:
                end = base
        return end

    def _check_direct_map(self) -> bool:
        """With CR3: the page of linux_banner (else _text) reached through the direct map
        is the same guest-physical page the image map gives. False when it cannot tell;
        TranslationError when the two disagree."""
        if self.cr3 is None:
            return False
        sym = self.symbols.get("linux_banner") or self.symbols.get("_text")
        if sym is None:
            return False
        kva = (sym.address + self.slide) & MASK64
        try:
            gpa = self.kva_to_gpa(kva)
            walked_image = self._walk(kva)
            walked_direct = self._walk(self.page_offset_base + gpa)
        except (TranslationError, OverflowError):
            return False
        if walked_image != gpa or walked_direct != gpa:
            raise TranslationError(
                f"{sym.name} at kva {kva:#x}: image map arithmetic gives gpa {gpa:#x}, the page "
                f"tables {walked_image:#x}, the direct map at page_offset_base "
                f"{self.page_offset_base:#x} {walked_direct:#x}: the layout found is wrong")
        return True

    def linear_kva_to_gpa(self, kva: int) -> int | None:
        """kva's guest-physical address through the kernel image map (va -
        __START_KERNEL_map + phys_base) or the direct map (va - page_offset_base), which
        only depend on values the kernel fixes at boot; None when kva is in neither
        (vmalloc, per-CPU chunks, modules: a page walk, whose answer can change)."""
        kva &= MASK64
        lo, hi = self._image
        if lo <= kva < hi:
            return (kva - START_KERNEL_MAP + self.phys_base) & MASK64
        end = self._direct_map_end
        if end is not None and self.page_offset_base <= kva < end:
            return kva - self.page_offset_base
        return None

    def view(self, reader, cr3=None) -> "LiveKernel":
        """The same live view (slide, phys_base, page_offset_base kept) reading through
        another reader and walking page tables from ``cr3`` (None: no page walks)."""
        other = copy.copy(self)
        other.reader = reader
        other.cr3 = cr3
        return other

    def kva_to_gpa(self, kva: int) -> int:
        """Guest-physical address of kernel virtual address kva."""
        kva &= MASK64
        gpa = self.linear_kva_to_gpa(kva)
        if gpa is not None:
            return gpa
        if self.cr3 is None:
            raise TranslationError(f"{kva:#x} is neither in the kernel image nor in the direct "
                                   f"map; translating it needs cr3 for a page-table walk")
        return self._walk(kva)

    def check_per_cpu(self, cpus=None) -> list[int]:
        """Cross-checks per-CPU resolution: each CPU's own `this_cpu_off` (x86 keeps its
        __per_cpu_offset there) read through our per-CPU address must equal
        __per_cpu_offset[cpu]. Returns the CPUs checked ([] when the kernel has no
        this_cpu_off); TranslationError naming the first that disagrees."""
        sym = self.symbols.get("this_cpu_off")
        if sym is None or not sym.percpu:
            return []
        cpus = list(self.possible_cpus() if cpus is None else cpus)
        for cpu in cpus:
            offset = self.per_cpu_offset(cpu)
            kva = self._base("this_cpu_off", cpu)
            own = struct.unpack("<Q", self.read_kva(kva, 8))[0]
            if own != offset:
                raise TranslationError(
                    f"cpu {cpu}: this_cpu_off at kva {kva:#x} reads {own:#x}, but "
                    f"__per_cpu_offset[{cpu}] is {offset:#x}: per-CPU addresses resolve wrong")
        return cpus

    def describe_layout(self, check_per_cpu: bool = True) -> str:
        """The slide, phys_base and bases found, and what agreed with them."""
        text = self.layout.describe()
        if check_per_cpu:
            try:
                cpus = self.check_per_cpu()
            except VmmError as e:
                return f"{text}; per-CPU check FAILED: {e}"
            if cpus:
                text += f"; per-CPU offsets agree with this_cpu_off on {len(cpus)} CPU(s)"
        return text

    def read_kva(self, kva: int, n: int) -> bytes:
        """n bytes at kernel virtual address kva (split at pages when page-walked)."""
        kva &= MASK64
        lo, hi = self._image
        if lo <= kva and kva + n <= hi:
            return self.reader.read(self.kva_to_gpa(kva), n)
        out = bytearray()
        while n > 0:
            chunk = min(n, 0x1000 - (kva & 0xFFF))
            out += self.reader.read(self.kva_to_gpa(kva), chunk)
            kva, n = kva + chunk, n - chunk
        return bytes(out)

    # ------------------------------------------------------------ per-CPU
    def nr_cpu_ids(self) -> int:
        """The guest's nr_cpu_ids (1 for a kernel without it)."""
        sym = self.symbols.get("nr_cpu_ids")
        if sym is None:
            return 1  # a !SMP kernel
        return struct.unpack("<I", self.read_kva(sym.address + self.slide, 4))[0]

    def possible_cpus(self) -> list[int]:
        """The CPUs in the guest's __cpu_possible_mask (0..nr_cpu_ids-1 without it)."""
        n = self.nr_cpu_ids()
        if n > 8192:
            raise TranslationError(f"nr_cpu_ids reads {n}: not a plausible CPU count "
                                   f"(wrong slide or kernel?)")
        mask_sym = self.symbols.get("__cpu_possible_mask")
        if mask_sym is None:
            return list(range(n))
        raw = self.read_kva(mask_sym.address + self.slide, (n + 63) // 64 * 8)
        bits = int.from_bytes(raw, "little")
        return [c for c in range(n) if bits >> c & 1]

    def per_cpu_offset(self, cpu: int) -> int:
        """__per_cpu_offset[cpu]: what CPU `cpu`'s per-CPU addresses add."""
        if cpu < 0:
            raise TargetError(f"cpu {cpu} is negative")
        sym = self.symbols.get("__per_cpu_offset")
        if sym is None:
            if cpu == 0:
                return 0  # !SMP: the per-CPU section is the only copy
            raise KernelFeatureMissing("kernel has no __per_cpu_offset (not SMP?)")
        n = self.nr_cpu_ids()
        if cpu >= n:
            raise TargetError(f"cpu {cpu} does not exist: nr_cpu_ids is {n}")
        return struct.unpack("<Q", self.read_kva(sym.address + self.slide + 8 * cpu, 8))[0]

    def per_cpu_offsets(self) -> list[int]:
        """``__per_cpu_offset[0 .. nr_cpu_ids)`` in one read ([0] on a !SMP kernel)."""
        sym = self.symbols.get("__per_cpu_offset")
        if sym is None:
            return [0]
        n = self.nr_cpu_ids()
        if n > 8192:
            raise TranslationError(f"nr_cpu_ids reads {n}: not a plausible CPU count "
                                   f"(wrong slide or kernel?)")
        return list(struct.unpack(f"<{n}Q", self.read_kva(sym.address + self.slide, 8 * n)))

    def per_cpu_address(self, name: str, cpu: int, path: str | None = None,
                        type: str | None = None) -> int:
        """The kernel virtual address of CPU `cpu`'s copy of `name` (or a field path in it)."""
        return self.address_of(name, path, cpu=cpu, type=type)

    # ------------------------------------------------------------ symbols and fields
    def symbol_address(self, name: str) -> int:
        """Runtime address of a non-per-CPU symbol (link address + slide)."""
        return (self.symbols.address(name) + self.slide) & MASK64

    def _base(self, name: str, cpu: int | None) -> int:
        sym = self.symbols.lookup(name)
        if not sym.percpu:
            if cpu is not None:
                raise TargetError(f"{name} is not a per-CPU variable; cpu={cpu} makes no sense")
            return (sym.address + self.slide) & MASK64
        if cpu is None:
            raise TargetError(f"{name} is a per-CPU variable: say which cpu")
        # Relative style: the value is an offset and KASLR does not move it.
        base = sym.address if sym.address < KERNEL_SPACE else sym.address + self.slide
        return (base + self.per_cpu_offset(cpu)) & MASK64

    def _var_type(self, name: str, type: str | None) -> Type | None:
        if type is not None:
            return self.kernel.btf.type(type)
        return self.kernel.var_type(name)

    def resolve(self, name: str, path: str | None = None, cpu: int | None = None,
                type: str | None = None) -> tuple[int, Field | None]:
        """(kva, field) of name[.path]; field is None without a path and without BTF."""
        base = self._base(name, cpu)
        vtype = self._var_type(name, type) if (path or self.kernel.has_btf) else None
        if not path:
            if vtype is None:
                return base, None
            return base, Field(0, self.kernel.btf.sizeof(vtype), vtype)
        if vtype is None:
            raise FieldPathError(f"type of {name} unknown (not in BTF as a variable): "
                                 f"pass type='struct ...'")
        btf = self.kernel.btf
        first, *derefs = path.split("->")
        f = btf.field(vtype, first) if first.strip() else Field(0, btf.sizeof(vtype), vtype)
        kva = (base + f.offset) & MASK64
        walked = f"{name}.{first}" if first.strip() else name
        # "a.ptr->b.c": read the pointer a.ptr from guest memory, go on from its target.
        for seg in derefs:
            ptr_type = btf.resolve(f.type)
            if ptr_type.kind != PTR:
                raise FieldPathError(f"{walked} is {btf.type_name(ptr_type)}, not a pointer: "
                                     f"cannot follow '->'")
            if not seg.strip():
                raise FieldPathError(f"nothing after '->' in {path!r}")
            target = struct.unpack("<Q", self.read_kva(kva, 8))[0]
            if target == 0:
                raise TargetError(f"{walked} is NULL: cannot follow '->{seg}'")
            f = btf.field(btf.get(ptr_type.ref), seg)
            kva = (target + f.offset) & MASK64
            walked += f"->{seg}"
        return kva, f

    def address_of(self, name: str, path: str | None = None, cpu: int | None = None,
                   type: str | None = None) -> int:
        """The kernel virtual address of `name` (or a field path in it; per CPU when cpu is
        given)."""
        return self.resolve(name, path, cpu, type)[0]

    def read(self, name: str, path: str | None = None, cpu: int | None = None,
             type: str | None = None) -> int | bytes:
        """Value of name[.path]: an int for 1/2/4/8-byte integers, enums, pointers and
        bitfields; bytes otherwise."""
        kva, f = self.resolve(name, path, cpu, type)
        if f is None:
            sym = self.symbols.lookup(name)
            if sym.size in (1, 2, 4, 8):
                return int.from_bytes(self.read_kva(kva, sym.size), "little")
            if sym.size:
                return self.read_kva(kva, sym.size)
            raise KernelFeatureMissing(f"size of {name} unknown (no BTF type, no symbol size): "
                                       f"read it with read_kva")
        raw = self.read_kva(kva, f.size)
        return self.decode(raw, f)

    def decode(self, raw: bytes, f: Field) -> int | bytes:
        """Raw bytes of field `f` as its BTF type reads: ints signed or not, bitfields as their
        bits, other types as bytes."""
        t = self.kernel.btf.resolve(f.type)
        if f.bit_size:
            v = (int.from_bytes(raw, "little") >> f.bit_offset) & ((1 << f.bit_size) - 1)
            if t.signed and v >> (f.bit_size - 1):
                v -= 1 << f.bit_size
            return v
        if t.kind in (INT, ENUM, ENUM64, PTR) and len(raw) in (1, 2, 4, 8):
            return int.from_bytes(raw, "little", signed=t.signed)
        return raw
