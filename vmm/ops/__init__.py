"""Kernel-memory ops: values, targets, batches (the seed's contract)."""

from .batch import EntryResult, Op, OpResult, apply_op
from .scx import clk_valid_mask, scx_clock_batch
from .targets import KernelTarget, Location
from .values import Bytes, KernelValue, OrU32, U32, U64

__all__ = ["Bytes", "EntryResult", "KernelTarget", "KernelValue", "Location", "Op", "OpResult",
           "OrU32", "U32", "U64", "apply_op", "clk_valid_mask", "scx_clock_batch"]
