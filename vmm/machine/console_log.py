"""ConsoleLog: everything the guest wrote to COM1, the panic scan, and waiting on it.

The console pump (or the serial device directly, before the start) appends; readers
take the text or wait on `changed`, a condition notified on every append and when the
VM ends. A copy of each chunk goes to the user's console writer, if any.
"""

from __future__ import annotations

import threading
from typing import Callable

from vmm.errors import ConfigError

PANIC_MARKER = b"Kernel panic - not syncing"


class ConsoleLog:
    """The guest's console output: kept, forwarded, scanned for a panic, waited on."""

    def __init__(self, out: Callable[[bytes], None] | None = None):
        self.out = out
        self._data = bytearray()
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def append(self, data: bytes) -> bool:
        """Adds `data`; True when a kernel panic line has just arrived."""
        with self.changed:
            scan_from = max(0, len(self._data) - len(PANIC_MARKER))
            self._data += data
            panicked = PANIC_MARKER in self._data[scan_from:]
            self.changed.notify_all()
        if self.out is not None:
            try:
                self.out(data)
            except Exception:  # a broken console sink must not kill the pump
                self.out = None
        return panicked

    def notify(self) -> None:
        """Wake every waiter on `changed`."""
        with self.changed:
            self.changed.notify_all()

    def text(self) -> str:
        """The whole console so far, decoded."""
        with self._lock:
            return self.text_locked()

    def text_locked(self) -> str:
        """The text, for a caller that holds `changed`."""
        return self._data.decode("utf-8", "replace")

    def as_bytes(self) -> bytes:
        """The whole console so far, as bytes."""
        with self._lock:
            return bytes(self._data)

    def tail(self, nbytes: int) -> str:
        """The last `nbytes` bytes, decoded."""
        with self._lock:
            return bytes(self._data[-nbytes:]).decode("utf-8", "replace")

    def panic_line(self) -> str:
        """The console's last kernel-panic line (the VM's exit detail)."""
        text = self.text()
        i = text.rfind(PANIC_MARKER.decode())
        return text[i:].splitlines()[0] if i >= 0 else "kernel panic"


def console_writer(console) -> Callable[[bytes], None] | None:
    """A writer for the Machine's `console` option: a binary stream, a callable or None."""
    if console is None:
        return None
    if callable(console) and not hasattr(console, "write"):
        return console
    if hasattr(console, "write"):
        def write(data: bytes, stream=console) -> None:
            stream.write(data)
            flush = getattr(stream, "flush", None)
            if flush is not None:
                flush()
        return write
    raise ConfigError(f"console must be a binary stream, a callable or None, not {console!r}")
