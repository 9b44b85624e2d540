"""Kernel-memory ops: values, targets, batches (the seed's contract)."""

from .batch import COLD, HOT, EntryResult, Mode, Op, OpResult, apply_op
from .scx import clk_valid_mask, scx_clock_batch
from .targets import FieldTarget, KernelTarget, Location, SymbolTarget
from .values import Bytes, KernelValue, OrU32, U32, U64

# The target classes are ...Target (vmm.kernel has Symbol and Field); vmm.ops.targets
# keeps Symbol and Field as their old names, and KernelTarget.Symbol/.Field too.
__all__ = ["Bytes", "COLD", "EntryResult", "FieldTarget", "HOT", "KernelTarget", "KernelValue",
           "Location", "Mode", "Op", "OpResult", "OrU32", "SymbolTarget", "U32", "U64",
           "apply_op", "clk_valid_mask", "scx_clock_batch"]
