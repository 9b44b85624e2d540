"""Port 0x600: each 32-bit out appends (vcpu_index, value) to `reports`.

Guests use it to tell the host facts (a vCPU counting in, a value it observed) without
going through the console. Outs of other widths are recorded too, zero-extended.
"""

from __future__ import annotations

import threading

# Reports kept: the first MAX_REPORTS (our guests send a few dozen records); a guest
# that writes the port without end gets the rest counted in `dropped`, not stored.
MAX_REPORTS = 1 << 16


class ReportPort:
    """The report port: records (vcpu, value) for each write; wait_for() blocks on a count."""

    def __init__(self):
        self.reports: list[tuple[int, int]] = []
        self.dropped = 0  # reports past MAX_REPORTS
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def state(self) -> dict:
        """The reports so far and the dropped count (for snapshots)."""
        with self._lock:
            return {"reports": [list(r) for r in self.reports], "dropped": self.dropped}

    def restore(self, state: dict) -> None:
        """Takes back what state() gave (at most MAX_REPORTS reports)."""
        reports = [(int(c), int(v)) for c, v in state["reports"]][:MAX_REPORTS]
        with self._changed:
            self.reports = reports
            self.dropped = int(state["dropped"])
            self._changed.notify_all()

    def io_in(self, port: int, size: int = 1) -> int:
        return 0

    def io_out(self, port: int, size: int, value: int, vcpu: int = -1) -> None:
        with self._changed:
            if len(self.reports) >= MAX_REPORTS:
                self.dropped += 1
                return
            self.reports.append((vcpu, value & ((1 << (8 * size)) - 1)))
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float | None = None) -> bool:
        """Block until at least `count` reports arrived; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.reports) >= count, timeout)
