"""Kernel: everything known about one kernel build, from its files alone.

    k = Kernel.load(vmlinux="vmlinux")                       # .symtab + .BTF
    k = Kernel.load(bzimage="vmlinuz", system_map="System.map")  # distro kernel
    k.symbol("runqueues"), k.btf.field("struct rq", "scx.flags"), k.enum("SCX_RQ_CLK_VALID")
    live = k.attach(guest_memory, cr3=..., lstar=...)        # see live.py
"""

from __future__ import annotations

import hashlib
import os

from vmm.errors import ImageError, KernelFeatureMissing, SymbolNotFound, TypeNotFound
from vmm.image.formats import extract_vmlinux
from vmm.kernel import cache
from vmm.kernel.btf import VAR, Btf, Type
from vmm.kernel.elf import ElfImage
from vmm.kernel.symbols import Symbol, SymbolTable
from vmm.kernel.sysmap import parse_system_map

PathOrBytes = str | os.PathLike | bytes

# Types of well-known kernel variables, for when BTF has no VAR record for them.
KNOWN_VAR_TYPES = {"runqueues": "struct rq", "init_uts_ns": "struct uts_namespace",
                   "init_task": "struct task_struct", "jiffies": "long unsigned int",
                   "jiffies_64": "u64", "nr_cpu_ids": "unsigned int"}


class Kernel:
    """A kernel's symbols and BTF (and its ELF when there is one): Kernel.load() builds it;
    attach() applies it to guest memory."""

    def __init__(self, symbols: SymbolTable, btf: Btf | None, build_id: str | None,
                 elf: ElfImage | None = None, sources: tuple[str, ...] = ()):
        self.symbols = symbols
        self._btf = btf
        self.build_id = build_id
        self.elf = elf  # kept for reading link-time contents (KASLR cross-check)
        self.sources = sources

    # ------------------------------------------------------------ loading
    @classmethod
    def load(cls, vmlinux: PathOrBytes | None = None, system_map: PathOrBytes | None = None,
             bzimage: PathOrBytes | None = None, btf: PathOrBytes | None = None) -> Kernel:
        """Load from any usable combination of files (paths or bytes).

        Symbols come from the vmlinux .symtab, else from System.map; BTF from the
        vmlinux (or the one inside the bzImage), or a raw BTF file (/sys/kernel/btf/vmlinux).
        """
        if vmlinux is None and bzimage is None and system_map is None and btf is None:
            raise ImageError("Kernel.load needs a vmlinux, a bzImage, a System.map or a BTF file")
        sources: list[str] = []
        elf = None
        if vmlinux is not None:
            elf = ElfImage(vmlinux)
            sources.append(_describe("vmlinux", vmlinux))
        elif bzimage is not None:
            data = _read(bzimage, "bzImage")
            elf = ElfImage(extract_vmlinux(data))
            sources.append(_describe("bzImage", bzimage))
        build_id = None
        syms: list[Symbol] = []
        btf_data = None
        if elf is not None:
            build_id = elf.build_id()
            symtab = elf.section(".symtab")
            if symtab is not None:
                # Keyed by the bytes the table is parsed from (a file patched in place
                # keeps its build id and symbol count): see cache.symtab_key.
                key = cache.symtab_key(elf)
                syms = [Symbol._make(s) for s in cache.cached(
                    key, lambda: _plain(elf.symbols()), _plain_symbols)]
            btf_data = elf.btf()
        if not syms and system_map is not None:
            text = _read(system_map, "System.map")
            key = "sysmap-" + hashlib.sha256(text).hexdigest()[:40]
            where = system_map if not isinstance(system_map, bytes) else "System.map"
            syms = [Symbol._make(s) for s in cache.cached(
                key, lambda: _plain(parse_system_map(text, what=str(where))), _plain_symbols)]
            sources.append(_describe("System.map", system_map))
        if btf is not None:
            btf_data = _read(btf, "BTF")
            sources.append(_describe("BTF", btf))
        parsed_btf = Btf(btf_data) if btf_data else None
        if not syms and parsed_btf is None:
            raise ImageError("no symbols and no BTF found in " + ", ".join(sources))
        return cls(SymbolTable(syms), parsed_btf, build_id, elf, tuple(sources))

    # ------------------------------------------------------------ queries
    @property
    def has_btf(self) -> bool:
        """True when the kernel came with BTF."""
        return self._btf is not None

    @property
    def btf(self) -> Btf:
        """The kernel's Btf; KernelFeatureMissing when it has none."""
        if self._btf is None:
            raise KernelFeatureMissing("this kernel has no BTF (build with CONFIG_DEBUG_INFO_BTF=y "
                                       "or pass the vmlinux)")
        return self._btf

    def symbol(self, name: str) -> int:
        """Link-time address of `name` (for a relative per-CPU symbol: its offset)."""
        return self.symbols.address(name)

    def enum(self, name: str) -> int:
        """The value of enumerator `name` (BTF)."""
        return self.btf.enum_value(name)

    def is_percpu(self, name: str) -> bool:
        """True when `name` is a per-CPU variable."""
        return self.symbols.is_percpu(name)

    @property
    def percpu_style(self) -> str | None:
        """How per-CPU symbols are addressed (relative offsets or absolute addresses), or None
        when unknown."""
        return self.symbols.percpu_style

    def var_type(self, name: str) -> Type | None:
        """The BTF type of global variable `name` (pahole emits per-CPU ones), or None."""
        if self._btf is None:
            return None
        for tid in self._btf._ids_named(name):
            if self._btf.kind_of(tid) == VAR:
                return self._btf.get(self._btf.get(tid).ref)
        # pahole does not always emit the VAR (e.g. a section-relative per-CPU layout
        # it did not recognise): fall back to the type every kernel gives these.
        known = KNOWN_VAR_TYPES.get(name)
        if known:
            try:
                t = self._btf.type(known)
            except TypeNotFound:
                return None
            sym = self.symbols.get(name)
            if sym is None or not sym.size or sym.size == self._btf.sizeof(t):
                return t
        return None

    def attach(self, reader, cr3: int | None = None, kaslr_slide: int | None = None,
               lstar: int | None = None, cr4: int | None = None, idt_base: int | None = None):
        """A live view of this kernel running in guest memory (see vmm.kernel.live)."""
        from vmm.kernel.live import LiveKernel

        return LiveKernel(self, reader, cr3=cr3, kaslr_slide=kaslr_slide, lstar=lstar,
                          cr4=cr4, idt_base=idt_base)

    def __repr__(self) -> str:
        return (f"<Kernel {', '.join(self.sources)} build-id={self.build_id} "
                f"symbols={len(self.symbols)} btf={'yes' if self.has_btf else 'no'}>")


def _plain(symbols: list[Symbol]) -> list[tuple]:
    return [tuple(s) for s in symbols]


def _plain_symbols(value) -> bool:
    """Does a cache entry look like _plain() output (same field count as Symbol)?"""
    return isinstance(value, list) and all(
        isinstance(s, tuple) and len(s) == len(Symbol._fields) for s in value[:1000])


def _read(src: PathOrBytes, what: str) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    try:
        with open(src, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read {what} {os.fspath(src)}: {e.strerror}") from None


def _describe(what: str, src: PathOrBytes) -> str:
    return f"{what} ({len(src)} bytes)" if isinstance(src, (bytes, bytearray)) else f"{what} {os.fspath(src)}"


__all__ = ["Kernel", "SymbolNotFound"]
