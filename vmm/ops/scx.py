"""The mission's batch (and its result, ScxInjection): mark every CPU's sched_ext rq
clock valid, as the kernel does.

``scx_rq_clock_update()`` (kernel/sched/sched.h) does ``WRITE_ONCE(rq->scx.clock, v)``
then ``smp_store_release(&rq->scx.flags, flags | SCX_RQ_CLK_VALID)``. The host
reproduces that observable invariant with one cold batch: for each CPU, a U64 write
of ``scx.clock`` followed by an OrU32 of ``SCX_RQ_CLK_VALID`` into ``scx.flags``. The
freeze rendezvous serialises the whole batch against guest readers, and OrU32 leaves
the other 31 flag bits (and the adjacent u32 ``nr_immed``) alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import FieldPathError, KernelFeatureMissing, SymbolNotFound, TypeNotFound, VmmError
from .targets import KernelTarget
from .values import KernelValue

RQ_SYMBOL = "runqueues"
CLOCK_PATH = "scx.clock"
FLAGS_PATH = "scx.flags"
CLK_VALID = "SCX_RQ_CLK_VALID"


def clk_valid_mask(kernel: Any) -> int:
    """SCX_RQ_CLK_VALID from the kernel's BTF; a clear refusal when it has none."""
    if not getattr(kernel, "has_btf", True):
        raise KernelFeatureMissing("this kernel has no BTF (.BTF section): build it with "
                                   "CONFIG_DEBUG_INFO_BTF=y to resolve sched_ext fields")
    try:
        rq_type = "struct rq"
        kernel.btf.field(rq_type, "scx")
    except (TypeNotFound, FieldPathError) as exc:
        raise KernelFeatureMissing(f"this kernel has no sched_ext ({exc}); "
                                   "build it with CONFIG_SCHED_CLASS_EXT=y") from exc
    try:
        # BTF may mark the enum signed; the flag word is a u32 either way.
        mask = kernel.enum(CLK_VALID) & 0xFFFFFFFF
        kernel.btf.field(rq_type, CLOCK_PATH)
    except (SymbolNotFound, TypeNotFound, FieldPathError, KeyError) as exc:
        raise KernelFeatureMissing(
            f"this kernel's sched_ext has no {CLK_VALID} / scx_rq.clock (added in Linux "
            f"6.14): {exc}") from exc
    if mask == 0 or mask & (mask - 1):
        raise KernelFeatureMissing(f"{CLK_VALID} = {mask:#x} is not a single u32 flag bit")
    return mask


def scx_clock_batch(kernel: Any, cpus: Iterable[int], clock: int) -> list:
    """(target, value) pairs: per CPU, write scx.clock then OR SCX_RQ_CLK_VALID."""
    mask = clk_valid_mask(kernel)
    batch = []
    for cpu in cpus:
        batch.append((KernelTarget.per_cpu(RQ_SYMBOL, cpu, CLOCK_PATH), KernelValue.u64(clock)))
        batch.append((KernelTarget.per_cpu(RQ_SYMBOL, cpu, FLAGS_PATH), KernelValue.or_u32(mask)))
    if not batch:
        raise VmmError("no CPUs to write: the guest reports no possible CPUs")
    return batch


@dataclass
class ScxCpuRow:
    """One CPU's scx.clock and scx.flags before and after the injection, and where they are."""

    cpu: int
    clock_before: int
    clock_after: int
    flags_before: int
    flags_after: int
    clock_addr: int
    flags_addr: int

    def ok(self, clock: int, mask: int) -> bool:
        """True when the clock was written and only the mask's bits were added to the flags."""
        return self.clock_after == clock and self.flags_after == self.flags_before | mask


@dataclass
class ScxInjection:
    """What vmm.Machine.inject_scx_clock() did: the clock and mask written, a row per
    CPU, and how long the guest was frozen and the batch took."""

    clock: int
    mask: int
    rows: list[ScxCpuRow]
    freeze_latency_us: float
    apply_us: float

    @property
    def ok(self) -> bool:
        """True when every CPU's row is ok."""
        return all(r.ok(self.clock, self.mask) for r in self.rows)

    def describe(self) -> str:
        """A table of every CPU's clock and flags before and after, for printing."""
        lines = [f"injected SCX_RQ_CLK_VALID ({self.mask:#x}) with scx.clock = {self.clock} on "
                 f"{len(self.rows)} CPU(s) in one cold batch (freeze {self.freeze_latency_us:.0f} us, "
                 f"apply {self.apply_us:.0f} us)",
                 f"{'cpu':>4} {'scx.clock before':>20} {'after':>20} {'scx.flags before':>17} "
                 f"{'after':>10}  gpa(clock/flags)"]
        for r in self.rows:
            lines.append(f"{r.cpu:>4} {r.clock_before:>20} {r.clock_after:>20} "
                         f"{r.flags_before:>#17x} {r.flags_after:>#10x}  "
                         f"{r.clock_addr:#x}/{r.flags_addr:#x}"
                         + ("" if r.ok(self.clock, self.mask) else "  MISMATCH"))
        lines.append("read back: " + ("every CPU has the written clock and only the flag bit "
                                      "added" if self.ok else "MISMATCH"))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """The injection as plain data (for --json)."""
        return {"clock": self.clock, "mask": self.mask, "ok": self.ok,
                "freeze_latency_us": self.freeze_latency_us, "apply_us": self.apply_us,
                "cpus": [r.__dict__ for r in self.rows]}
