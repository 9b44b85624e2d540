"""StallWatch: the sampling thread behind m.watch_for_stall.

It knows no kernel: it asks a Monitor (vmm.runtime.monitor) for its stall verdict every
``interval`` and hands each stall not yet reported to ``capture`` (the session's: one
freeze, vmm.kernel.stall_dump's StallReport), then to ``on_stall``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from vmm.errors import VmmError


class StallWatch:
    """The thread behind watch_for_stall: polls ``monitor.stalls(window_s, ...)`` every
    ``interval`` s; a stall not reported yet (a CPU and its run's start) is captured with
    ``capture(stalls) -> StallReport`` (which freezes), kept in ``.reports`` and passed
    to ``on_stall``. ``.wait(timeout)`` -> the first report or None; ``.stop()`` (also
    the monitor's); a context manager. on_stall's exceptions go to ``.errors``."""

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
        self._seen: set[tuple[int, float]] = set()
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
                stalls = self.monitor.stalls(self.window_s, self.min_cpu_fraction)
            except VmmError as exc:
                self.errors.append(exc)
                return
            new = [s for s in stalls if (s.cpu, round(s.start, 6)) not in self._seen]
            if not new:
                continue
            self._seen.update((s.cpu, round(s.start, 6)) for s in new)
            try:
                report = self.capture(new)
            except VmmError as exc:  # the VM ended under us
                self.errors.append(exc)
                return
            self.reports.append(report)
            self._found.set()
            if self.on_stall is not None:
                try:
                    self.on_stall(report)
                except Exception as exc:
                    self.errors.append(exc)
