"""StallWatch: the sampling thread behind m.watch_for_stall.

It knows no kernel: it asks a Monitor (vmm.runtime.monitor) for its stall verdict every
``interval`` and hands each stall not yet reported to ``capture`` (the session's: one
freeze, vmm.kernel.stall_dump's StallReport), then to ``on_stall``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from vmm.errors import VmmError

# Reports (every CPU's rq each) and on_stall errors kept; a guest that stalls all run
# long cannot make them grow without end.
MAX_REPORTS = 256


class StallWatch:
    """The thread behind watch_for_stall: polls ``monitor.stalls(window_s, ...)`` every
    ``interval`` s; a stall not reported yet is captured with ``capture(stalls) ->
    StallReport`` (which freezes), kept in ``.reports`` (the first MAX_REPORTS; later ones
    counted in ``dropped_reports``) and passed to ``on_stall``. A stall is new when it
    starts after the end of the last one reported on its CPU: a stall that goes on is
    one stall, also once its start has dropped out of the monitor's kept samples.
    ``.wait(timeout)`` -> the first report or None; ``.stop()`` (also the monitor's); a
    context manager. on_stall's exceptions go to ``.errors`` (the first MAX_REPORTS)."""

    def __init__(self, monitor: Any, capture: Callable[[list], Any], window_s: float,
                 on_stall: Optional[Callable[[Any], Any]] = None, interval: float = 0.1,
                 min_cpu_fraction: float = 0.1, own_monitor: bool = True):
        if not window_s > 0:
            raise VmmError(f"watch_for_stall: window_s must be positive, not {window_s}")
        self.monitor = monitor
        self.capture = capture
        self.window_s = window_s
        self.on_stall = on_stall
        self.interval = interval
        self.min_cpu_fraction = min_cpu_fraction
        self.own_monitor = own_monitor
        self.reports: list[Any] = []
        self.errors: list[BaseException] = []
        self.dropped_reports = 0
        self._last_end: dict[int, float] = {}  # per CPU: the end of its stall seen last
        self._stop = threading.Event()
        self._found = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmm-stall-watch", daemon=True)

    def start(self) -> "StallWatch":
        self._thread.start()
        return self

    @property
    def report(self) -> Optional[Any]:
        """The first report, or None."""
        return self.reports[0] if self.reports else None

    def wait(self, timeout: Optional[float] = None) -> Optional[Any]:
        self._found.wait(timeout)
        return self.report

    def stop(self) -> "StallWatch":
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self.own_monitor:
            self.monitor.stop()
        return self

    def __enter__(self) -> "StallWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.monitor.active and self.monitor.ended:
                return
            try:
                stalls = self.monitor.stalls(self.window_s, self.min_cpu_fraction, tasks=False)
            except VmmError as exc:
                self.errors.append(exc)
                return
            new = [s for s in stalls if s.start > self._last_end.get(s.cpu, float("-inf"))]
            for s in stalls:  # a stall that goes on moves its end, not its identity
                self._last_end[s.cpu] = max(s.end, self._last_end.get(s.cpu, s.end))
            if not new:
                continue
            try:
                report = self.capture(new)
            except VmmError as exc:  # the VM ended under us
                self.errors.append(exc)
                return
            if len(self.reports) < MAX_REPORTS:
                self.reports.append(report)
            else:
                self.dropped_reports += 1
            self._found.set()
            if self.on_stall is not None:
                try:
                    self.on_stall(report)
                except Exception as exc:
                    if len(self.errors) < MAX_REPORTS:
                        self.errors.append(exc)
