"""Kernel-memory ops: values, targets, batches (the seed's contract).

Names load on first use (vmm/lazy.py)."""

from typing import TYPE_CHECKING

from vmm.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("COLD", "EntryResult", "HOT", "Mode", "Op", "OpResult", "apply_op"), "batch"),
    **dict.fromkeys(("clk_valid_mask", "scx_clock_batch"), "scx"),
    **dict.fromkeys(("FieldTarget", "KernelTarget", "Location", "SymbolTarget"), "targets"),
    **dict.fromkeys(("Bytes", "KernelValue", "OrU32", "U32", "U64"), "values"),
})
__all__ = ["Bytes", "COLD", "EntryResult", "FieldTarget", "HOT", "KernelTarget", "KernelValue",
           "Location", "Mode", "Op", "OpResult", "OrU32", "SymbolTarget", "U32", "U64",
           "apply_op", "clk_valid_mask", "scx_clock_batch"]

if TYPE_CHECKING:
    from .batch import COLD, HOT, EntryResult, Mode, Op, OpResult, apply_op
    from .scx import clk_valid_mask, scx_clock_batch
    from .targets import FieldTarget, KernelTarget, Location, SymbolTarget
    from .values import Bytes, KernelValue, OrU32, U32, U64
