"""Where each CPU's run-queue counters are, for a monitor that samples them without
freezing (vmm.runtime.monitor reads the plan made here).

Per-CPU addresses never move once the kernel has set ``__per_cpu_offset``, so every
field's guest-physical address is resolved once, through BTF (``struct rq``, the type of
the per-CPU ``runqueues``) and the live view's per-CPU offsets and translation; the
monitor then reads each with one load of the field's width (GuestMemory.read_u32 /
read_u64). An aligned 4- or 8-byte load is one instruction and cannot tear; a field
found misaligned is marked so (the monitor reads it twice until two reads agree, and
says so).

Fields a layout lacks (our test guest's ``scx.local_dsq`` is a bare list_head, so no
``scx.local_dsq.nr``), or that are not plain 1/2/4/8-byte integers, are skipped and
listed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from vmm.errors import KernelFeatureMissing, VmmError
from vmm.kernel.btf import ENUM, ENUM64, INT

#: What a sched_ext developer watches on every CPU (struct rq member paths).
RQ_FIELDS = ("nr_running", "scx.nr_running", "clock", "scx.flags", "scx.local_dsq.nr")


@dataclass(frozen=True)
class RqSlot:
    """One field of one CPU's rq: where it is and how wide."""

    cpu: int
    field: str
    kva: int
    gpa: int
    width: int

    @property
    def aligned(self) -> bool:
        """One load of this width at this address cannot tear."""
        return self.gpa % self.width == 0


@dataclass(frozen=True)
class RqPlan:
    """What to sample: the CPUs, the fields present, the slots (CPU-major, fields in
    order), and the fields skipped with why."""

    symbol: str
    cpus: tuple[int, ...]
    fields: tuple[str, ...]
    slots: tuple[RqSlot, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    def raw(self) -> list[tuple[int, int, int]]:
        """[(row, gpa, width)] in slot order, row = index into cpus: what the runtime's
        monitor needs (it knows nothing of kernels)."""
        index = {c: i for i, c in enumerate(self.cpus)}
        return [(index[s.cpu], s.gpa, s.width) for s in self.slots]


def plan_rq_sampling(live, fields: Iterable[str] = RQ_FIELDS, cpus: Optional[Iterable[int]] = None,
                     symbol: str = "runqueues") -> RqPlan:
    """Resolve ``fields`` of ``symbol`` (a per-CPU struct rq) on ``cpus`` (default: every
    possible CPU) to guest-physical addresses through ``live`` (a LiveKernel). Call it
    frozen or early: it reads nr_cpu_ids and __per_cpu_offset once."""
    kernel = live.kernel
    if not kernel.is_percpu(symbol):
        raise KernelFeatureMissing(f"{symbol} is not a per-CPU variable of this kernel")
    if not kernel.has_btf:
        raise KernelFeatureMissing("this kernel has no BTF (CONFIG_DEBUG_INFO_BTF): run-queue "
                                   "fields are found through it")
    btf = kernel.btf
    rq_type = kernel.var_type(symbol) or btf.type("struct rq")
    cpu_list = tuple(live.possible_cpus() if cpus is None else cpus)
    present: list[str] = []
    skipped: dict[str, str] = {}
    for path in fields:
        try:
            f = btf.field(rq_type, path)
        except VmmError as e:
            skipped[path] = f"not in this kernel's {btf.type_name(rq_type)} ({e})"
            continue
        t = btf.resolve(f.type)
        if f.bit_size:
            skipped[path] = "a bitfield: no single load reads it alone"
        elif t.kind not in (INT, ENUM, ENUM64) or f.size not in (1, 2, 4, 8):
            skipped[path] = f"{btf.type_name(t)} ({f.size} bytes) is not a 1/2/4/8-byte integer"
        else:
            present.append(path)
    slots = []
    for cpu in cpu_list:
        for path in present:
            f = btf.field(rq_type, path)
            kva = live.per_cpu_address(symbol, cpu, path)
            slots.append(RqSlot(cpu, path, kva, live.kva_to_gpa(kva), f.size))
    return RqPlan(symbol, cpu_list, tuple(present), tuple(slots), skipped)
