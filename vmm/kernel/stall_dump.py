"""A stall caught in the act: m.watch_for_stall (vmm.Machine.watch_for_stall).

A monitor (vmm.runtime.monitor) samples every CPU's run queue; a thread
(vmm.runtime.stall_watch) asks its stall verdict (``Monitor.stalls``) every ``interval``
and, on a stall it has not yet reported, has the machine frozen at once and this module
captures, inside that one freeze:

- vmm's own read of every CPU's rq: the monitor's fields (nr_running, scx.nr_running,
  clock, scx.flags, scx.local_dsq.nr where the kernel has them) and ``curr->pid`` /
  ``curr->comm`` (the task on the CPU) where ``struct rq`` has ``curr``;
- the tasks queued on each stalled CPU, pid and comm, from its sched_ext runnable list
  (vmm.kernel.rq_tasks: ``rq->scx.runnable_list``, walked bounded);
- sched_ext's state (``m.scx.state()``: enabled or not, the scheduler, its exit kind and
  message), or why it could not be read (a kernel without sched_ext says so).

Everything comes from guest memory. The kernel's own sched_ext debug dump (what
``echo D > /proc/sysrq-trigger`` prints with CONFIG_MAGIC_SYSRQ) is made by the guest's
kernel code, which the host cannot run: a guest that wants it triggers sysrq D itself;
the report says so rather than pretending to have it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from vmm.errors import VmmError
from vmm.kernel.rq_tasks import queued_on

#: The task on each CPU, where struct rq has ``curr`` (a task_struct pointer).
CURR_FIELDS = ("curr->pid", "curr->comm")

KERNEL_DUMP_NOTE = ("the kernel's own sched_ext dump (sysrq D) runs kernel code: not "
                    "taken from the host; this report is what guest memory says")


def _text(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")
    return value


def read_rq_rows(live: Any, cpus: Sequence[int], fields: Sequence[str],
                 symbol: str = "runqueues") -> tuple[list[dict], dict[str, str]]:
    """Every CPU's rq: {"cpu": n, field: value, ...} per CPU (``fields`` then
    CURR_FIELDS where present), and {field: why} for those this kernel lacks. Call it
    frozen (one instant)."""
    rows: list[dict] = []
    missing: dict[str, str] = {}
    for cpu in cpus:
        row: dict = {"cpu": cpu}
        for path in tuple(fields) + CURR_FIELDS:
            if path in missing:
                continue
            try:
                row[path] = _text(live.read(symbol, path, cpu=cpu))
            except VmmError as exc:
                if path.startswith("curr->") and "NULL" in str(exc):
                    row[path] = None  # no task on it (an offline CPU)
                else:
                    missing[path] = str(exc)
        rows.append(row)
    return rows, missing


@dataclass
class StallReport:
    """What watch_for_stall captured: the stalls the monitor found (Stall), the time of
    the capture (monitor seconds), every CPU's rq at that instant, fields the kernel
    lacks, sched_ext's state (an ScxState) or why it could not be read, and the freeze's
    latency."""

    stalls: list
    t: float
    rows: list[dict]
    missing: dict[str, str] = field(default_factory=dict)
    scx: Any = None
    scx_error: Optional[str] = None
    freeze_latency_us: Optional[float] = None
    notes: list[str] = field(default_factory=lambda: [KERNEL_DUMP_NOTE])
    queued: dict = field(default_factory=dict)   # {cpu: rq_tasks.QueuedTasks}, stalled CPUs
    queued_error: Optional[str] = None           # why no task list was read

    @property
    def cpus(self) -> list[int]:
        """The stalled CPUs."""
        return [s.cpu for s in self.stalls]

    def describe(self) -> str:
        lines = [f"stall caught at {self.t:.3f} s (monitor time): cpu(s) "
                 f"{', '.join(str(c) for c in self.cpus)}"]
        lines += ["  " + s.describe() for s in self.stalls]
        lines.append("run queues, read from guest memory while frozen"
                     + (f" ({self.freeze_latency_us:.0f} us to freeze):"
                        if self.freeze_latency_us is not None else ":"))
        for row in self.rows:
            mark = "*" if row["cpu"] in self.cpus else " "
            cells = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                             for k, v in row.items() if k != "cpu")
            lines.append(f" {mark}cpu {row['cpu']}: {cells}")
        for name, why in self.missing.items():
            lines.append(f"  (no {name}: {why})")
        for q in self.queued.values():
            lines.append("  " + q.describe())
        if self.queued_error:
            lines.append(f"  (no queued tasks: {self.queued_error})")
        if self.scx is not None:
            s = self.scx
            lines.append(f"sched_ext: state {s.state}, ops {s.ops}, exit_kind {s.exit_kind}"
                         + (f", reason {s.exit_reason!r}" if s.exit_reason else "")
                         + (f", msg {s.exit_msg!r}" if s.exit_msg else ""))
        else:
            lines.append(f"sched_ext: not read ({self.scx_error})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def capture_report(stalls: list, live: Any, cpus: Sequence[int], fields: Sequence[str],
                   t: float, scx_state: Callable[[], Any],
                   freeze_latency_us: Optional[float] = None) -> StallReport:
    """A StallReport from ``live`` (a frozen view): every CPU's rq and sched_ext's state."""
    rows, missing = read_rq_rows(live, cpus, fields)
    queued, queued_error = {}, None
    try:
        queued = queued_on(live, sorted({s.cpu for s in stalls}))
    except VmmError as exc:
        queued_error = str(exc)
    scx = err = None
    try:
        scx = scx_state()
    except VmmError as exc:
        err = str(exc)
    return StallReport(list(stalls), t, rows, missing, scx, err, freeze_latency_us,
                       queued=queued, queued_error=queued_error)


def monotonic_since(t0: Optional[float]) -> float:
    return time.monotonic() - (t0 if t0 is not None else time.monotonic())
