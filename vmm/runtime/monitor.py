"""A sampling thread over guest memory that never freezes the guest, and the stall verdict
over its samples.

The monitor knows nothing of kernels: it is given guest-physical addresses and widths
(vmm.kernel.rq_sample resolves them through BTF once, at the start: per-CPU addresses
never move) and reads each with one load of that width through GuestMemory.read_u8/16/
32/64 (vmm_load_*: a single volatile load when aligned). An aligned load of 8 bytes or
less cannot tear, so each value is one the guest really stored; a misaligned slot (none
of the run-queue fields is) is read twice until two reads agree and counted in
``Monitor.reread``. Values of different fields and CPUs in one sample are NOT one
instant: the guest runs between the loads (freeze for that).

Every sample also records each vCPU thread's own host CPU time
(/proc/self/task/TID/schedstat, else utime+stime of .../stat), which tells a stalled
CPU from a vCPU the host did not run (find_stalls). Linux CPU n is taken to run on
vCPU n (vmm lists the vCPUs' APIC ids in order, and Linux numbers CPUs in that order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from vmm.errors import VmmError
from vmm.runtime.stall_verdict import Sample, Stall, find_stalls  # noqa: F401 (re-exported)

# The most sample rows (one CPU's fields in one sample, ~400 bytes each) a monitor keeps
# by default: ~40 MB at most; at 2 CPUs and 0.1 s, the last 83 minutes.
MAX_ROWS = 100_000
ROW_FIELDS = 5  # the fields of the row that estimate is for: wider rows (the sched_ext
                # event columns) count as that many rows more


def thread_cpu_seconds(tid: Optional[int]) -> Optional[float]:
    """Host CPU seconds of thread ``tid`` of this process (None when it is gone)."""
    if tid is None:
        return None
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/self/task/{tid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class GuardedColumns:
    """Columns whose addresses hang off a pointer that changes (sched_ext's event
    counters live in the attached scheduler's per-CPU data, freed when it detaches).

    ``guard_gpa``: where the pointer is (read with one aligned 8-byte load; None: the
    addresses never move and ``locate(0)`` is called once); ``locate(value)`` -> the
    slots [(row, gpa, width)] for a non-zero pointer value (each row's ``fields`` in
    order), or raises VmmError. Each sample reads the guard before and after these
    columns and keeps their values only when both reads agree with the value they were
    located for; else (no pointer, a change in between, locate failed) they are None."""

    fields: tuple[str, ...]
    guard_gpa: Optional[int]
    locate: Callable[[int], Sequence[tuple[int, int, int]]]


SYS_IOCTL = b"16"  # x86-64's ioctl, as /proc/PID/task/TID/syscall names it


class ThreadClock:
    """A thread's host CPU seconds, read again and again cheaply: its schedstat file kept
    open and re-read with pread (half the cost of opening it each time); else
    thread_cpu_seconds. None once the thread is gone."""

    def __init__(self, tid: Optional[int]):
        self.tid = tid
        self._fd: Optional[int] = None
        if tid is not None:
            try:
                self._fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._fd = None

    def read(self) -> Optional[float]:
        return self.read_both()[0]

    def halted_in_kvm(self) -> Optional[bool]:
        """Is the thread asleep inside an ioctl (a vCPU thread: KVM_RUN with the guest
        halted, waiting for an interrupt) rather than running or parked by vmm (a futex)?
        None when it cannot be told (/proc/self/task/TID/syscall unreadable)."""
        if self.tid is None:
            return None
        try:
            with open(f"/proc/self/task/{self.tid}/syscall", "rb") as f:
                first = f.read(16).split(None, 1)[0]
        except (OSError, IndexError):
            return None
        return first == SYS_IOCTL

    def read_both(self) -> tuple[Optional[float], Optional[float]]:
        """(seconds run, seconds runnable but waiting for a host core) so far; the wait
        is None where schedstat is not there."""
        if self._fd is None:
            return thread_cpu_seconds(self.tid), None
        try:
            fields = os.pread(self._fd, 128, 0).split()
            return int(fields[0]) / 1e9, int(fields[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return None, None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Monitor:
    """Samples guest memory every ``interval`` seconds on its own thread, unfrozen.

    memory: GuestMemory; cpus: the CPU numbers of the rows; fields: the field names;
    slots: [(row, gpa, width)] (each row's fields in ``fields`` order); threads: the vCPU
    threads (VcpuThread: .tid); running: () -> whether the VM runs (sampling ends when
    it does not); skipped: {field: why} for the record. A context manager: ``with``
    starts (if not started) and stops it. ``.samples`` keeps the last ``max_samples``
    (default: MAX_ROWS rows' worth, a row of more than ROW_FIELDS fields counting as
    more, at least 1000 samples; ``taken`` counts every sample, ``dropped`` those no
    longer kept), so a run of any length stays bounded; ``.ended``
    says why sampling ended on its own (the VM stopped, memory closed). ``tasks_of(cpus)``
    -> {cpu: tasks}: ``stalls()`` names what is queued on a CPU still stalled at the last
    sample (read at that call). ``guarded``:
    more columns whose addresses follow a pointer (GuardedColumns; ``fields`` is
    ``fixed_fields`` then ``guarded_fields``); ``describe()`` says what is sampled and
    what is skipped and why."""

    def __init__(self, memory, cpus: Sequence[int], fields: Sequence[str],
                 slots: Sequence[tuple[int, int, int]], threads: Sequence = (),
                 interval: float = 0.1, running: Callable[[], bool] = lambda: True,
                 skipped: Optional[dict] = None, cpu_vcpu: Optional[Sequence[Optional[int]]] = None,
                 max_samples: Optional[int] = None, guarded: Optional[GuardedColumns] = None,
                 tasks_of: Optional[Callable[[list], dict]] = None):
        if not interval > 0:
            raise VmmError(f"monitor interval must be positive, not {interval}")
        self.memory = memory
        self.cpus = tuple(cpus)
        self.fixed_fields = tuple(fields)   # at addresses that never move
        self.guarded_fields = tuple(guarded.fields) if guarded is not None else ()
        self.fields = self.fixed_fields + self.guarded_fields
        self._guarded = guarded
        self._tasks_of = tasks_of
        self._guard_at: Optional[int] = None      # the guard value the slots were located for
        self._guard_rows: Optional[list[list]] = None
        self.guard_error: Optional[str] = None    # why the last locate failed
        self.relocations = 0                      # how often the guarded columns moved
        self.skipped = dict(skipped or {})
        self.interval = interval
        self.threads = list(threads)
        self.cpu_vcpu = tuple(cpu_vcpu) if cpu_vcpu is not None else tuple(
            c if c < len(self.threads) else None for c in self.cpus)
        self._running = running
        readers = {1: memory.read_u8, 2: memory.read_u16, 4: memory.read_u32, 8: memory.read_u64}
        per_row: list[list] = [[] for _ in self.cpus]
        for row, gpa, width in slots:
            if width not in readers:
                raise VmmError(f"monitor slot at gpa {gpa:#x}: width {width} is not 1/2/4/8")
            per_row[row].append((readers[width], gpa, gpa % width == 0))
        for row, entries in enumerate(per_row):
            if len(entries) != len(self.fixed_fields):
                raise VmmError(f"monitor row {row}: {len(entries)} slots for "
                               f"{len(self.fixed_fields)} fields")
        self._readers = readers
        self._rows = per_row
        if guarded is not None and guarded.guard_gpa is None:
            self._relocate(0)
        if max_samples is None:
            widths = max(ROW_FIELDS, len(self.fields)) / ROW_FIELDS
            max_samples = max(1000, int(MAX_ROWS // (max(1, len(self.cpus)) * widths)))
        if max_samples < 1:
            raise VmmError(f"monitor max_samples must be at least 1, not {max_samples}")
        self.samples: deque[Sample] = deque(maxlen=max_samples)  # the oldest drop off
        self.taken = 0  # samples taken since the start (kept or dropped)
        self.reread = 0             # misaligned slots that needed more than one pair of reads
        self.sample_cpu_s = 0.0     # host CPU seconds the sampling itself took
        self.sample_wall_s = 0.0    # wall seconds it took (more when the host is busy)
        self.ended: Optional[str] = None
        self.t0: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._clocks: Optional[list[ThreadClock]] = None
        self._last_cpu_time: tuple = ()

    # --- the thread -----------------------------------------------------------------
    def start(self) -> "Monitor":
        """Start sampling (once); returns self."""
        if self._thread is None:
            if not self._running():
                raise VmmError("the VM is not running: nothing to monitor")
            self.t0 = time.monotonic()
            self._thread = threading.Thread(target=self._loop, name="vmm-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> "Monitor":
        """Stop sampling and wait for the thread; returns self."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._thread is None or not self._thread.is_alive():
            self._close_clocks()
        return self

    def _close_clocks(self) -> None:
        clocks, self._clocks = self._clocks, None
        for c in clocks or ():
            c.close()

    @property
    def active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        try:
            self._sample_until_stopped()
        finally:
            self._close_clocks()

    def _sample_until_stopped(self) -> None:
        assert self.t0 is not None
        due = self.t0
        while not self._stop.is_set():
            if not self._running():
                self.ended = "the VM stopped"
                return
            c0, w0 = time.thread_time(), time.monotonic()
            try:
                self.samples.append(self.sample())
                self.taken += 1
            except VmmError as e:  # memory closed under us: the VM ended
                self.ended = f"sampling failed: {e}"
                return
            self.sample_cpu_s += time.thread_time() - c0
            self.sample_wall_s += time.monotonic() - w0
            due += self.interval
            now = time.monotonic()
            if due < now:
                due = now + self.interval  # fell behind (host busy): no burst to catch up
            self._stop.wait(due - now)

    def _load(self, read, gpa: int, aligned: bool) -> int:
        if aligned:
            return read(gpa)
        first = read(gpa)
        for _ in range(8):
            second = read(gpa)
            if second == first:
                return first
            self.reread += 1
            first = second
        return first

    def sample(self) -> Sample:
        """Take one sample now (the thread calls this every interval)."""
        t = time.monotonic() - (self.t0 if self.t0 is not None else time.monotonic())
        if self._clocks is None:
            self._clocks = [ThreadClock(getattr(th, "tid", None)) for th in self.threads]
        both = [c.read_both() for c in self._clocks]
        cpu_time = tuple(b[0] for b in both)
        wait_time = tuple(b[1] for b in both)
        # a vCPU whose thread has not run since the last sample: asleep in KVM_RUN (the
        # guest halted it) or parked by vmm? (/proc's syscall file, read only then)
        last = self._last_cpu_time
        halted = tuple(c.halted_in_kvm() if (t is not None and i < len(last) and last[i] == t)
                       else False for i, (c, t) in enumerate(zip(self._clocks, cpu_time)))
        self._last_cpu_time = cpu_time
        rows = tuple({name: self._load(read, gpa, aligned)
                      for name, (read, gpa, aligned) in zip(self.fixed_fields, entries)}
                     for entries in self._rows)
        if self._guarded is not None:
            self._sample_guarded(rows)
        return Sample(t, cpu_time, rows, wait_time, halted)

    def _relocate(self, value: int) -> None:
        """Find the guarded columns' slots for guard value ``value`` (see GuardedColumns)."""
        g = self._guarded
        assert g is not None
        self._guard_at, self._guard_rows = value, None
        if g.guard_gpa is not None and not value:
            return
        self.relocations += 1
        try:
            per_row: list[list] = [[] for _ in self.cpus]
            for row, gpa, width in g.locate(value):
                if width not in self._readers or not 0 <= row < len(self.cpus):
                    raise VmmError(f"guarded slot row {row} width {width}: not a 1/2/4/8-byte "
                                   f"slot of a sampled CPU")
                per_row[row].append((self._readers[width], gpa, gpa % width == 0))
            if any(len(r) != len(g.fields) for r in per_row):
                raise VmmError(f"guarded columns: not {len(g.fields)} slots on every CPU")
        except VmmError as e:
            self.guard_error = str(e)
            return
        self.guard_error = None
        self._guard_rows = per_row

    def _sample_guarded(self, rows: tuple) -> None:
        g = self._guarded
        assert g is not None
        value = 0 if g.guard_gpa is None else self.memory.read_u64(g.guard_gpa)
        if value != self._guard_at:
            self._relocate(value)
        entries = self._guard_rows
        values = None
        if entries is not None:
            values = [[self._load(read, gpa, aligned) for read, gpa, aligned in r] for r in entries]
            if g.guard_gpa is not None and self.memory.read_u64(g.guard_gpa) != value:
                values = None  # the pointer changed under the loads: they may be of freed memory
        for i, row in enumerate(rows):
            row.update(zip(g.fields, values[i] if values is not None else [None] * len(g.fields)))

    def describe(self) -> str:
        """One line: what is sampled, and what is not and why."""
        text = (f"monitor of CPUs {','.join(map(str, self.cpus))} every {self.interval} s: "
                f"{', '.join(self.fixed_fields)}")
        if self.guarded_fields:
            text += f"; {len(self.guarded_fields)} more ({', '.join(self.guarded_fields[:3])}, ...)"
        for name, why in self.skipped.items():
            text += f"; no {name}: {why}"
        return text

    # --- the series -----------------------------------------------------------------
    def times(self) -> list[float]:
        return [s.t for s in self.samples]

    def column(self, field: str, cpu: int) -> list:
        """The values of ``field`` on CPU ``cpu``, one per sample."""
        if field not in self.fields:
            why = self.skipped.get(field)
            raise VmmError(f"no column {field!r}" + (f": skipped, {why}" if why else
                                                     f"; sampled: {', '.join(self.fields)}"))
        try:
            row = self.cpus.index(cpu)
        except ValueError:
            raise VmmError(f"cpu {cpu} is not sampled (cpus {list(self.cpus)})") from None
        return [s.rows[row][field] for s in list(self.samples)]

    def vcpu_column(self, cpu: int) -> list[Optional[float]]:
        """CPU ``cpu``'s vCPU thread's host CPU seconds, one per sample."""
        v = self.cpu_vcpu[self.cpus.index(cpu)]
        return [None if v is None or v >= len(s.vcpu_cpu_time) else s.vcpu_cpu_time[v]
                for s in list(self.samples)]

    def stalls(self, window_s: float = 1.0, min_cpu_fraction: float = 0.1,
               tasks: bool = True) -> list[Stall]:
        """find_stalls over the samples so far (needs the ``clock`` field). With
        ``tasks`` (and a ``tasks_of``), a stall still going on at the last sample gets
        ``.tasks``: what is queued on its CPU, read now (one freeze for all of them)."""
        if "clock" not in self.fields:
            raise VmmError("stall detection needs the rq clock ('clock'): "
                           + self.skipped.get("clock", "not sampled"))
        samples = list(self.samples)
        found = find_stalls(samples, self.cpus, window_s, min_cpu_fraction, self.cpu_vcpu)
        ongoing = [st for st in found if st.end == samples[-1].t]
        if not tasks or not ongoing or self._tasks_of is None or not self._running():
            return found
        try:  # still stalled at the last sample: name what is queued there now
            tasks = self._tasks_of(sorted({st.cpu for st in ongoing}))
        except VmmError as e:
            tasks = {st.cpu: f"queued tasks not read: {e}" for st in ongoing}
        return [dataclasses.replace(st, tasks=tasks.get(st.cpu)) if st in ongoing else st
                for st in found]

    @property
    def dropped(self) -> int:
        """Samples taken but no longer kept (past max_samples)."""
        return self.taken - len(self.samples)

    def overhead(self) -> Optional[float]:
        """Host CPU seconds per sample the sampling thread spent (None before any)."""
        return self.sample_cpu_s / self.taken if self.taken else None

    def wall_per_sample(self) -> Optional[float]:
        """Wall seconds per sample taken (None before any)."""
        return self.sample_wall_s / self.taken if self.taken else None

    def as_dict(self) -> dict:
        return {
            "interval": self.interval, "cpus": list(self.cpus), "fields": list(self.fields),
            "skipped": self.skipped, "cpu_vcpu": list(self.cpu_vcpu), "ended": self.ended,
            "reread": self.reread, "overhead_cpu_s_per_sample": self.overhead(),
            "guarded_fields": list(self.guarded_fields), "guard_error": self.guard_error,
            "taken": self.taken, "dropped": self.dropped,
            "samples": [{"t": s.t, "vcpu_cpu_time": list(s.vcpu_cpu_time),
                         "vcpu_wait_time": list(s.vcpu_wait_time),
                         "vcpu_halted": list(s.vcpu_halted),
                         "cpus": [dict(r) for r in s.rows]} for s in list(self.samples)],
        }

    def to_json(self, **kwargs) -> str:
        """The whole series as JSON (as_dict)."""
        return json.dumps(self.as_dict(), **kwargs)
