"""The monitor's time series as plain data, whatever its source: a live Monitor
(vmm.runtime.monitor), its ``as_dict()``, or the JSON it wrote (``vmm run --monitor-json``).

The JSON is read generically: every column the samples carry is kept (a newer monitor's
extra counters included), and what a plot or a report needs is derived here: the stall
windows (the JSON's own ``stalls`` when it has them, else vmm.runtime.monitor.find_stalls
over the samples), the scheduler's exit (from sched_ext states, as ``vmm run --scx-state
--json`` reports them, or an ScxState), and freezes when the series records them
(a ``freezes`` list of ``{"start", "end"}`` or ``[start, end]``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from vmm.errors import VmmError
from vmm.runtime.monitor import Sample, find_stalls

#: The largest monitor JSON read (a monitor keeps ~100,000 CPU rows, ~40 MB as JSON).
MAX_JSON_BYTES = 256 << 20
#: Events (exits, freezes, notes) kept from one series: a plot cannot show more.
MAX_EVENTS = 256


@dataclass(frozen=True)
class Event:
    """Something at monitor time ``t`` (seconds), up to ``end`` for a window: kind "exit"
    (the scheduler exited), "freeze" (every vCPU parked), "stall" (a CPU stalled) or
    "note"; ``label`` says what, ``cpu`` which CPU where one is meant."""

    t: float
    label: str
    kind: str = "note"
    end: Optional[float] = None
    cpu: Optional[int] = None

    def as_dict(self) -> dict:
        return {"t": self.t, "label": self.label, "kind": self.kind, "end": self.end, "cpu": self.cpu}


@dataclass
class Series:
    """Sample times, CPUs and per-CPU columns ({field: [column of CPU cpus[i]]}), with the
    stall windows, exits and freezes as Events."""

    times: list[float]
    cpus: list[int]
    columns: dict[str, list[list[Optional[float]]]]
    interval: Optional[float] = None
    stalls: list[Event] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def fields(self) -> list[str]:
        return list(self.columns)

    def column(self, name: str, cpu: int) -> list[Optional[float]]:
        return self.columns[name][self.cpus.index(cpu)]

    def advance(self, name: str = "clock", scale: float = 1e-6) -> list[list[Optional[float]]]:
        """Per CPU, how far ``name`` moved since the previous sample (times ``scale``:
        the rq clock's ns as ms); None for the first sample and unknown values."""
        out = []
        for col in self.columns.get(name, []):
            row: list[Optional[float]] = [None]
            for a, b in zip(col, col[1:]):
                row.append(None if a is None or b is None else (b - a) * scale)
            out.append(row)
        return out

    def add_scx_states(self, states: Iterable[Any]) -> "Series":
        """Mark the scheduler's exits: ``states`` are ScxState objects or their dicts
        (``t`` in monitor seconds where known, else the end of the series)."""
        for s in states:
            d = s.as_dict() if hasattr(s, "as_dict") else dict(s)
            kind = d.get("exit_kind")
            if not kind:
                continue
            t = d.get("t")
            t = float(t) if isinstance(t, (int, float)) else (self.times[-1] if self.times else 0.0)
            label = kind + (f" ({d['exit_reason']})" if d.get("exit_reason") else "")
            if not any(e.kind == "exit" and e.label == label for e in self.events):
                self._add(Event(t, label, "exit"))
        return self

    def _add(self, event: Event) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append(event)

    def as_dict(self) -> dict:
        return {"times": self.times, "cpus": self.cpus, "columns": self.columns,
                "stalls": [e.as_dict() for e in self.stalls],
                "events": [e.as_dict() for e in self.events]}


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _window(item: Any) -> Optional[tuple[float, float]]:
    if isinstance(item, dict):
        a, b = item.get("start", item.get("t")), item.get("end")
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        a, b = item
    else:
        return None
    a, b = _number(a), _number(b)
    if a is None:
        return None
    return float(a), float(b if b is not None else a)


def series_from_dict(d: dict, window_s: float = 1.0, min_cpu_fraction: float = 0.1) -> Series:
    """A Series from a monitor's as_dict() (or its JSON, loaded). VmmError naming what is
    wrong when it is not one."""
    if not isinstance(d, dict) or not isinstance(d.get("samples"), list) or not isinstance(d.get("cpus"), list):
        raise VmmError("not a monitor series: expected a JSON object with 'cpus' and 'samples' "
                       "(what m.monitor().to_json() and vmm run --monitor-json write)")
    cpus = [int(c) for c in d["cpus"]]
    names: list[str] = [f for f in d.get("fields") or [] if isinstance(f, str)]
    times: list[float] = []
    rows_per_sample = []
    for s in d["samples"]:
        if not isinstance(s, dict) or _number(s.get("t")) is None or not isinstance(s.get("cpus"), list):
            raise VmmError("a monitor sample needs 't' (seconds) and 'cpus' (one object per CPU)")
        rows = [r if isinstance(r, dict) else {} for r in s["cpus"]][:len(cpus)]
        rows += [{}] * (len(cpus) - len(rows))
        for r in rows:  # every column the samples carry, in first-seen order
            names.extend(k for k in r if k not in names and isinstance(k, str))
        times.append(float(s["t"]))
        rows_per_sample.append((s, rows))
    columns = {name: [[_number(rows[i].get(name)) for _, rows in rows_per_sample]
                      for i in range(len(cpus))] for name in names}
    series = Series(times, cpus, columns, interval=_number(d.get("interval")),
                    skipped=dict(d.get("skipped") or {}),
                    meta={k: d[k] for k in ("taken", "dropped", "ended") if k in d})
    if isinstance(d.get("stalls"), list):  # the monitor's own verdict, when it wrote one
        for st in d["stalls"][:MAX_EVENTS]:
            w = _window(st)
            if w and isinstance(st, dict):
                label = str(st.get("describe") or st.get("label") or f"cpu {st.get('cpu')} stalled")
                series.stalls.append(Event(w[0], label[:200], "stall", w[1], st.get("cpu")))
    elif "clock" in columns:
        samples = [Sample(float(s["t"]), tuple(_number(v) for v in (s.get("vcpu_cpu_time") or [])),
                          tuple(rows), tuple(_number(v) for v in (s.get("vcpu_wait_time") or [])),
                          tuple(v is True for v in (s.get("vcpu_halted") or [])))
                   for s, rows in rows_per_sample]
        cpu_vcpu = d.get("cpu_vcpu") if isinstance(d.get("cpu_vcpu"), list) else None
        for st in find_stalls(samples, cpus, window_s, min_cpu_fraction, cpu_vcpu)[:MAX_EVENTS]:
            what = "idle with work queued" if st.kind == "idle" else "stalled"
            series.stalls.append(Event(st.start, f"cpu {st.cpu} {what} {st.duration:.1f} s", "stall",
                                       st.end, st.cpu))
    for item in (d.get("freezes") or [])[:MAX_EVENTS] if isinstance(d.get("freezes"), list) else []:
        w = _window(item)
        if w:
            series._add(Event(w[0], "freeze", "freeze", w[1]))
    for item in (d.get("events") or [])[:MAX_EVENTS] if isinstance(d.get("events"), list) else []:
        if isinstance(item, dict) and _number(item.get("t")) is not None:
            series._add(Event(float(item["t"]), str(item.get("label", ""))[:200],
                              str(item.get("kind", "note")), _number(item.get("end")), item.get("cpu")))
    if isinstance(d.get("sched_ext states"), list):
        series.add_scx_states(x for x in d["sched_ext states"] if isinstance(x, dict))
    return series


def load_series(source: Any, window_s: float = 1.0, min_cpu_fraction: float = 0.1) -> Series:
    """A Series from a Monitor (anything with as_dict()), a dict, or a JSON file's path."""
    if isinstance(source, Series):
        return source
    if hasattr(source, "as_dict"):
        return series_from_dict(source.as_dict(), window_s, min_cpu_fraction)
    if isinstance(source, dict):
        return series_from_dict(source, window_s, min_cpu_fraction)
    path = os.fspath(source)
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise VmmError(f"{path}: {size} bytes is more than a monitor writes "
                       f"({MAX_JSON_BYTES >> 20} MiB at most): not a monitor's JSON?")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise VmmError(f"{path}: not JSON ({e}); expected what vmm run --monitor-json writes") from None
    try:
        return series_from_dict(data, window_s, min_cpu_fraction)
    except VmmError as e:
        raise VmmError(f"{path}: {e}") from None


def scx_exit_events(states: Sequence[Any]) -> list[Event]:
    """Exit events of sched_ext states (ScxState or dicts), for a plot's markers."""
    return Series([], [], {}).add_scx_states(states).events
