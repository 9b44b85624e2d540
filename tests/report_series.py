"""Synthetic recorded monitor series (what Monitor.as_dict() / vmm run --monitor-json
write) for the report tests: deterministic, small, shaped like the real thing."""

from __future__ import annotations

import random

FIELDS = ["nr_running", "scx.nr_running", "clock", "scx.flags", "scx.local_dsq.nr"]


def series(cpus: int = 2, seconds: float = 6.0, interval: float = 0.1,
           stalls: tuple = ((1, 2.0, 4.5),), seed: int = 1, extra_column: bool = False) -> dict:
    """cpus CPUs sampled every interval for seconds; ``stalls``: (cpu, start, end) windows
    in which that CPU has 3 runnable tasks while its rq clock stands still (its vCPU runs)."""
    rnd = random.Random(seed)
    clock = [0] * cpus
    samples = []
    n = int(round(seconds / interval))
    for i in range(n):
        t = round(i * interval, 6)
        rows = []
        for c in range(cpus):
            stalled = any(c == sc and a <= t <= b for sc, a, b in stalls)
            if not stalled:
                clock[c] += int(interval * 1e9) + rnd.randint(0, 5_000_000)
            queued = 3 if stalled else rnd.randint(0, 2)
            row = {"nr_running": queued, "scx.nr_running": queued, "clock": clock[c],
                   "scx.flags": 1, "scx.local_dsq.nr": rnd.randint(0, 2) if not stalled else 3}
            if extra_column:  # a column a newer monitor adds (unknown here: kept, not drawn)
                row["scx.events.SCX_EV_SELECT_CPU_FALLBACK"] = i // 10
            rows.append(row)
        samples.append({"t": t, "vcpu_cpu_time": [t * 0.9] * cpus, "cpus": rows})
    return {"interval": interval, "cpus": list(range(cpus)), "fields": list(FIELDS),
            "skipped": {}, "cpu_vcpu": list(range(cpus)), "ended": None, "reread": 0,
            "overhead_cpu_s_per_sample": 1e-4, "taken": n, "dropped": 0, "samples": samples}


def error_exit_states(t: float = 5.0) -> list[dict]:
    """sched_ext states as vmm run --scx-state --json reports them: enabled, then the
    watchdog's error exit at t."""
    return [{"state": "enabled", "ops": "simple", "exit_kind": None, "exit_reason": None,
             "exit_msg": None, "t": 0.0},
            {"state": "disabling", "ops": "simple", "exit_kind": "SCX_EXIT_ERROR_STALL",
             "exit_reason": "runnable task stall",
             "exit_msg": "kworker/1:1[42] failed to run for 4.5s", "t": t}]
