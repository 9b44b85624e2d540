"""Kernel introspection: ELF and System.map symbols, BTF types, per-CPU, KASLR, page walk.

Names load on first use (vmm/lazy.py)."""

from typing import TYPE_CHECKING

from vmm.lazy import lazy_exports

__all__ = ["Btf", "Field", "Kernel", "LiveKernel", "Symbol", "SymbolTable", "Type",
           "format_btf", "format_symbols", "image_symbols"]
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("Btf", "Field", "Type"), "btf"),
    "Kernel": "kernel",
    "LiveKernel": "live",
    **dict.fromkeys(("Symbol", "SymbolTable"), "symbols"),
    **dict.fromkeys(("format_btf", "format_symbols"), "text"),
})


def image_symbols(image: bytes | str) -> "SymbolTable":
    """The symbol table of a kernel ELF (its bytes or its path): what the runtime Machine's `symbol_table`
    option takes, to name RIPs in internal-error reports (passed down from above)."""
    from vmm.kernel.kernel import Kernel

    return Kernel.load(vmlinux=image).symbols


if TYPE_CHECKING:
    from vmm.kernel.btf import Btf, Field, Type
    from vmm.kernel.kernel import Kernel
    from vmm.kernel.live import LiveKernel
    from vmm.kernel.symbols import Symbol, SymbolTable
    from vmm.kernel.text import format_btf, format_symbols
