"""The stall verdict over a monitor's samples (vmm.runtime.monitor): a CPU with runnable
tasks whose rq clock stood still over a window while its vCPU thread got host CPU time.

Knows no kernel: a Sample holds one dict of field values per CPU; vmm.runtime.monitor
takes them and re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from vmm.errors import VmmError


HALTED_SHARE = 0.8  # of a window's samples asleep in KVM_RUN, for an "idle" verdict (a
                    # halted vCPU still wakes now and then for a timer)


@dataclass(frozen=True)
class Sample:
    """One sample: t seconds since the monitor started (time.monotonic), each vCPU
    thread's host CPU seconds so far (None: thread gone or unreadable), and one dict
    {field: value} per CPU (in Monitor.cpus order)."""

    t: float
    vcpu_cpu_time: tuple[Optional[float], ...]
    rows: tuple[dict, ...]
    # each vCPU thread's host seconds runnable but waiting for a host core so far
    # (schedstat's second field; empty or None: unknown)
    vcpu_wait_time: tuple[Optional[float], ...] = ()
    # each vCPU thread asleep in KVM_RUN (the guest halted it) since the last sample, as
    # opposed to running or parked by vmm (empty or None: unknown)
    vcpu_halted: tuple[Optional[bool], ...] = ()


@dataclass(frozen=True)
class Stall:
    """CPU ``cpu`` had runnable tasks while its rq clock stood at ``clock`` from ``start``
    to ``end`` (monitor seconds) and its vCPU thread ran ``vcpu_cpu_s`` host CPU seconds
    meanwhile (None: unknown). nr_running / scx_nr_running: the most seen in the window
    (None where the kernel has no such field)."""

    cpu: int
    start: float
    end: float
    nr_running: Optional[int]
    scx_nr_running: Optional[int]
    clock: int
    vcpu_cpu_s: Optional[float]
    samples: int
    tasks: Any = None   # the tasks queued there (an object with describe()), if read
    # "stuck": the vCPU ran and the rq clock stood still; "idle": the guest halted the
    # vCPU (its thread neither ran nor waited for a host core) with tasks queued there
    kind: str = "stuck"


    @property
    def duration(self) -> float:
        return self.end - self.start

    def describe(self) -> str:
        queued = ", ".join(f"{k} {v}" for k, v in (("nr_running", self.nr_running),
                                                  ("scx.nr_running", self.scx_nr_running))
                           if v is not None)
        ran = "?" if self.vcpu_cpu_s is None else f"{self.vcpu_cpu_s:.3f}"
        if self.kind == "idle":
            text = (f"cpu {self.cpu} idle with work queued {self.start:.3f}-{self.end:.3f} s "
                    f"({self.duration:.3f} s): {queued} runnable, but the guest halted its "
                    f"vCPU (it ran {ran} s and waited for no host core)")
        else:
            text = (f"cpu {self.cpu} stalled {self.start:.3f}-{self.end:.3f} s ({self.duration:.3f} s): "
                    f"{queued} runnable, rq clock stuck at {self.clock}, its vCPU ran {ran} s "
                    f"of host CPU")
        if self.tasks is not None:
            text += "; " + (self.tasks.describe() if hasattr(self.tasks, "describe") else str(self.tasks))
        return text


def find_stalls(samples: Sequence[Sample], cpus: Sequence[int], window_s: float = 1.0,
                min_cpu_fraction: float = 0.1, cpu_vcpu: Optional[Sequence[Optional[int]]] = None,
                clock_field: str = "clock",
                runnable_fields: Iterable[str] = ("nr_running", "scx.nr_running")) -> list[Stall]:
    """Stalls in a sample series: a run of consecutive samples on one CPU, at least
    ``window_s`` long, in which the CPU had runnable tasks (any of ``runnable_fields`` >
    0) and its ``clock_field`` did not change, while its vCPU thread got host CPU
    time for at least ``min_cpu_fraction`` of that run (0.1: 10%): kind "stuck". An idle
    CPU (nothing runnable) is not stalled; neither is a vCPU the host did not run
    (frozen, descheduled: its thread waited for a host core, schedstat's wait time): its
    clock cannot advance. But a vCPU whose thread neither ran nor waited that long, and
    was asleep in KVM_RUN at 80% of the samples at least (not parked by vmm), was halted by the guest
    itself with tasks queued on its CPU all along: kind "idle", whether or not the clock
    moved meanwhile (a scheduler that stopped dispatching; the kernel's own watchdog may
    never run then). Unknown vCPU time (None)
    does not excuse a stall; unknown wait time or halt state makes no "idle" verdict.
    ``cpu_vcpu[i]``: the vCPU index of cpus[i] (default: the same number)."""
    if window_s <= 0:
        raise VmmError(f"stall window must be positive, not {window_s}")
    runnable_fields = tuple(runnable_fields)
    out: list[Stall] = []
    for ci, cpu in enumerate(cpus):
        vcpu = cpu_vcpu[ci] if cpu_vcpu is not None else cpu

        def cpu_time(s: Sample) -> Optional[float]:
            if vcpu is None or vcpu >= len(s.vcpu_cpu_time):
                return None
            return s.vcpu_cpu_time[vcpu]

        def wait_time(s: Sample) -> Optional[float]:
            if vcpu is None or vcpu >= len(s.vcpu_wait_time):
                return None
            return s.vcpu_wait_time[vcpu]

        def close(a: int, b: int, idle: bool) -> None:
            first, last = samples[a], samples[b]
            if b <= a or last.t - first.t < window_s:
                return
            span = last.t - first.t
            t0, t1 = cpu_time(first), cpu_time(last)
            ran = None if t0 is None or t1 is None else t1 - t0
            low = ran is not None and ran < min_cpu_fraction * span
            if not idle and low:
                return  # the host did not run it, or the guest halted it: not "stuck"
            if idle:
                w0, w1 = wait_time(first), wait_time(last)
                halted = [vcpu is not None and vcpu < len(s.vcpu_halted) and s.vcpu_halted[vcpu]
                          for s in samples[a + 1:b + 1]]
                if (not low or w0 is None or w1 is None or w1 - w0 >= min_cpu_fraction * span
                        or sum(halted) < HALTED_SHARE * len(halted)):
                    return  # it ran, or the host held or descheduled it, or we cannot tell
            run = samples[a:b + 1]

            def most(name: str) -> Optional[int]:
                vals = [s.rows[ci].get(name) for s in run]
                return None if all(v is None for v in vals) else max(v or 0 for v in vals)
            out.append(Stall(cpu, first.t, last.t, most("nr_running"), most("scx.nr_running"),
                             first.rows[ci][clock_field], ran, len(run),
                             kind="idle" if idle else "stuck"))

        # "stuck": runnable and the rq clock standing still while the vCPU ran
        start: Optional[int] = None
        for i, s in enumerate(samples):
            row = s.rows[ci]
            busy = any((row.get(f) or 0) > 0 for f in runnable_fields)
            if (busy and start is not None
                    and row.get(clock_field) == samples[start].rows[ci].get(clock_field)):
                continue
            if start is not None:
                close(start, i - 1, idle=False)
            start = i if busy and row.get(clock_field) is not None else None
        if start is not None:
            close(start, len(samples) - 1, idle=False)
        # "idle": runnable all along while the guest kept the vCPU halted; the clock may
        # move meanwhile (a timer's wakeup updates it without running the queued work)
        start = None
        for i, s in enumerate(samples):
            busy = any((s.rows[ci].get(f) or 0) > 0 for f in runnable_fields)
            if busy and start is None:
                start = i
            elif not busy and start is not None:
                close(start, i - 1, idle=True)
                start = None
        if start is not None:
            close(start, len(samples) - 1, idle=True)
    out.sort(key=lambda st: (st.start, st.cpu))
    return out
