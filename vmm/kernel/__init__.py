"""Kernel introspection: ELF and System.map symbols, BTF types, per-CPU, KASLR, page walk."""

from vmm.kernel.btf import Btf, Field, Type
from vmm.kernel.kernel import Kernel
from vmm.kernel.live import LiveKernel
from vmm.kernel.symbols import Symbol, SymbolTable
from vmm.kernel.text import format_btf, format_symbols

__all__ = ["Btf", "Field", "Kernel", "LiveKernel", "Symbol", "SymbolTable", "Type",
           "format_btf", "format_symbols", "image_symbols"]


def image_symbols(image: bytes) -> SymbolTable:
    """The symbol table of a kernel ELF's bytes: what the runtime Machine's `symbol_table`
    option takes, to name RIPs in internal-error reports (passed down from above)."""
    return Kernel.load(vmlinux=image).symbols
