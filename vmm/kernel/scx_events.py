"""sched_ext's own event counters, per CPU, for the monitor (vmm.runtime.monitor samples
them unfrozen, beside the run-queue fields of vmm.kernel.rq_sample).

The kernel counts scheduler events (``SCX_EV_SELECT_CPU_FALLBACK``,
``SCX_EV_DISPATCH_KEEP_LAST``, ...) in ``struct scx_event_stats``, one ``s64`` member per
event, per CPU; ``scx_bpf_events()`` and sysfs sum them. Where the copy lives depends on
the layout (each found through BTF, the first that fits wins):

- 7.x (checked against Linux 7.3's kernel/sched/ext/internal.h): the attached root
  scheduler's per-CPU data, ``scx_root->pcpu`` (``struct scx_sched_pcpu __percpu *``),
  member ``event_stats``;
- 6.16-like: ``scx_root->event_stats_cpu`` (``struct scx_event_stats __percpu *``);
- 6.15-like: the static per-CPU variable ``event_stats_cpu``.

In the first two the counters belong to one scheduler: they appear when it attaches and
are freed when it detaches, so their addresses hang off ``scx_root``. The plan gives the
monitor ``scx_root``'s address as a guard and ``locate(sched)`` to find the counters of
the scheduler ``sched`` (the pointer read once, per-CPU offsets added, each address
translated): the monitor relocates them whenever the guard changes and reports None
while no scheduler is attached (vmm.runtime.monitor.GuardedColumns). Every counter is
an aligned 8-byte member: one load each, no tearing.

A kernel without these (no sched_ext, no BTF, another layout) gets no event columns, and
the reason in the monitor's ``skipped`` under :data:`EVENTS_KEY`: never a crash.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from vmm.errors import KernelFeatureMissing, VmmError
from vmm.kernel.btf import ENUM, ENUM64, INT, PTR, STRUCT
from vmm.runtime.monitor import GuardedColumns

EVENTS_STRUCT = "struct scx_event_stats"
#: The key of the monitor's ``skipped`` that says why there are no event columns.
EVENTS_KEY = "SCX_EV_*"
#: More members than any plausible scx_event_stats: a BTF that says otherwise is refused.
MAX_EVENTS = 256


@dataclass(frozen=True)
class EventLayout:
    """Where the counters are: ``names``/``offsets`` of the 8-byte members inside
    struct scx_event_stats; ``via``: "pcpu" (scx_root->pcpu + stats_off), "percpu_ptr"
    (scx_root->event_stats_cpu) or "static" (the per-CPU symbol ``event_stats_cpu``);
    ``ptr_off``: the pointer's offset in struct scx_sched (None for static)."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    via: str
    ptr_off: Optional[int]
    stats_off: int
    skipped: tuple[str, ...] = ()

    @classmethod
    def of(cls, kernel: Any) -> "EventLayout":
        """The layout in ``kernel`` (vmm.kernel.Kernel); KernelFeatureMissing saying why
        there is none."""
        if not kernel.has_btf:
            raise KernelFeatureMissing("this kernel has no BTF (CONFIG_DEBUG_INFO_BTF): "
                                       "sched_ext's event counters are found through it")
        btf = kernel.btf
        try:
            stats = btf.resolve(btf.type(EVENTS_STRUCT))
        except VmmError:
            raise KernelFeatureMissing(f"this kernel has no {EVENTS_STRUCT} (no sched_ext, or "
                                       f"one older than its event counters)") from None
        if stats.kind != STRUCT or not stats.members or len(stats.members) > MAX_EVENTS:
            raise KernelFeatureMissing(f"{EVENTS_STRUCT} in this BTF is not a struct of "
                                       f"counters (a layout the monitor does not know)")
        names, offsets, skipped = [], [], []
        for m in stats.members:
            t = btf.resolve(m.type_id)
            if (m.bitfield_size or m.bit_offset % 64 or t.kind not in (INT, ENUM, ENUM64)
                    or t.size != 8 or not m.name):
                skipped.append(m.name or "<anonymous>")
                continue
            names.append(m.name)
            offsets.append(m.bit_offset // 8)
        if not names:
            raise KernelFeatureMissing(f"{EVENTS_STRUCT} has no aligned 8-byte counter")
        syms = kernel.symbols
        if "scx_root" in syms:
            for member, via in (("pcpu", "pcpu"), ("event_stats_cpu", "percpu_ptr")):
                try:
                    f = btf.field("struct scx_sched", member)
                except VmmError:
                    continue
                if btf.resolve(f.type).kind != PTR:
                    continue
                stats_off = 0
                if via == "pcpu":
                    try:
                        stats_off = btf.field("struct scx_sched_pcpu", "event_stats").offset
                    except VmmError:
                        continue
                return cls(tuple(names), tuple(offsets), via, f.offset, stats_off, tuple(skipped))
        if kernel.is_percpu("event_stats_cpu"):
            return cls(tuple(names), tuple(offsets), "static", None, 0, tuple(skipped))
        raise KernelFeatureMissing(f"this kernel has {EVENTS_STRUCT} but neither "
                                   f"scx_root->pcpu->event_stats, scx_root->event_stats_cpu nor "
                                   f"a per-CPU event_stats_cpu: a layout the monitor does not know")


@dataclass(frozen=True)
class EventPlan:
    """What the monitor needs: the column names, the guard (``scx_root``'s guest-physical
    address, None for the static layout) and ``locate(sched)`` -> [(row, gpa, 8)]
    (rows: indexes into ``cpus``)."""

    layout: EventLayout
    cpus: tuple[int, ...]
    guard_gpa: Optional[int]
    live: Any

    @property
    def fields(self) -> tuple[str, ...]:
        return self.layout.names

    def locate(self, sched: int) -> list[tuple[int, int, int]]:
        """The counters' slots for scheduler ``sched`` (scx_root's value; ignored for the
        static layout). VmmError when the pointer or a translation is bad."""
        lay, live = self.layout, self.live
        if lay.via == "static":
            bases = [live.per_cpu_address("event_stats_cpu", cpu) for cpu in self.cpus]
        else:
            ptr = struct.unpack("<Q", live.read_kva(sched + lay.ptr_off, 8))[0]
            if not ptr:
                raise VmmError(f"scx_sched {sched:#x} has no per-CPU data yet")
            offsets = live.per_cpu_offsets()
            bases = []
            for cpu in self.cpus:
                if cpu >= len(offsets):
                    raise VmmError(f"cpu {cpu} is past nr_cpu_ids ({len(offsets)})")
                bases.append((ptr + offsets[cpu] + lay.stats_off) & (1 << 64) - 1)
        slots = []
        for row, base in enumerate(bases):
            page_gpa: dict[int, int] = {}
            for off in lay.offsets:
                kva = base + off
                page = kva & ~0xFFF
                if page not in page_gpa:  # one translation per page of counters
                    page_gpa[page] = live.kva_to_gpa(page)
                slots.append((row, page_gpa[page] + (kva & 0xFFF), 8))
        return slots


def plan_scx_events(live: Any, cpus: Sequence[int]) -> EventPlan:
    """An EventPlan over ``cpus`` through ``live`` (a LiveKernel);
    KernelFeatureMissing (EventLayout.of) when this kernel has no event counters the
    monitor can find."""
    layout = EventLayout.of(live.kernel)
    guard = None if layout.via == "static" else live.kva_to_gpa(live.symbol_address("scx_root"))
    return EventPlan(layout, tuple(cpus), guard, live)


def plan_scx_event_columns(live: Any, cpus: Sequence[int], skipped: dict) -> tuple[Any, dict]:
    """For m.monitor: (GuardedColumns of the event counters or None, ``skipped`` plus,
    when there are none, :data:`EVENTS_KEY` -> why). Never raises for a kernel without
    them."""
    skipped = dict(skipped)
    try:
        plan = plan_scx_events(live, cpus)
    except VmmError as e:
        skipped[EVENTS_KEY] = f"no sched_ext event counters: {e}"
        return None, skipped
    if plan.layout.skipped:
        skipped[EVENTS_KEY] = ("not 8-byte counters, not sampled: "
                               + ", ".join(plan.layout.skipped))
    return GuardedColumns(plan.fields, plan.guard_gpa, plan.locate), skipped
