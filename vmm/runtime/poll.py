"""Poller: a thread that calls one function every `interval` seconds and keeps what changed.

For what has no place in the run-queue monitor (vmm/runtime/monitor.py) but must still be
followed over a whole run without freezing the guest: sched_ext's state (the CLI's
``vmm run --scx-state`` polls vmm.kernel.scx_state), or any other reading that
changes rarely. It knows nothing of kernels: it gets a callable returning a value and a
key function saying when two values are "the same".

Bounded whatever the guest does: at most `max_changes` changes are kept (the later ones
are counted, not kept), and the thread ends at the first exception (kept in `error`): a
reader that fails once (the VM ended, the kernel lacks the feature) would fail again.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

MAX_CHANGES = 1000


class Poller:
    """``Poller(read, interval, key=None).start()``; ``.changes`` is [(t, value)] for the
    first value and every value whose ``key`` differs from the one before (t: seconds since
    the start); ``.stop()`` ends the thread (also the context manager's exit)."""

    def __init__(self, read: Callable[[], Any], interval: float = 0.1,
                 key: Optional[Callable[[Any], Any]] = None, max_changes: int = MAX_CHANGES):
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.read = read
        self.interval = interval
        self.key = key or (lambda value: value)
        self.max_changes = max_changes
        self.changes: list[tuple[float, Any]] = []
        self.dropped = 0  # changes past max_changes: counted, not kept
        self.polls = 0
        self.error: Optional[BaseException] = None
        self._last: Any = object()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0 = 0.0

    def start(self) -> "Poller":
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="vmm-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> "Poller":
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return self

    def __enter__(self) -> "Poller":
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def last(self) -> Any:
        """The newest value kept (None before the first)."""
        return self.changes[-1][1] if self.changes else None

    def poll_once(self) -> None:
        """One reading; kept when its key differs from the previous reading's."""
        value = self.read()
        self.polls += 1
        k = self.key(value)
        if k != self._last:
            self._last = k
            if len(self.changes) < self.max_changes:
                self.changes.append((time.monotonic() - self._t0, value))
            else:
                self.dropped += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # kept for the caller; the thread ends
                self.error = exc
                return
            self._stop.wait(self.interval)
