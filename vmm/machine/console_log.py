"""ConsoleLog: what the guest wrote to COM1, the panic scan, and waiting on it.

The console pump (or the serial device directly, before the start) appends; readers
take the text or wait on `changed`, a condition notified on every append and when the
VM ends. A copy of each chunk goes to the user's console writer, if any.

Memory is bounded: only the last `window` bytes (DEFAULT_WINDOW, 4 MiB, unless the
Machine's `console_window` says otherwise) are kept; older bytes are dropped from the
front and counted (`dropped`; `total` counts every byte seen). The whole log, every
byte, can be streamed to a file the user names (`path`, the Machine's `console_log`;
created owner-only, mode 0600, as it holds guest output). Positions are absolute byte
offsets into the whole stream (0 = the guest's first byte), so they stay valid when the
window moves; the window starts at `dropped`.

`ConsoleScan` searches for a regex incrementally: each search decodes and scans only
what arrived since the last one, plus SCAN_OVERLAP bytes before it, so a match that
spans two appends is still found; its cost is proportional to the new data.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Callable

from vmm.errors import ConfigError
from vmm.hostio import open_private
from vmm.machine.layout import parse_size

PANIC_MARKER = b"Kernel panic - not syncing"
DEFAULT_WINDOW = 4 << 20  # bytes of console kept in memory
MIN_WINDOW = 4096  # at least the tail a VmExit carries (builder.CONSOLE_TAIL_BYTES)
# A search rescans this many bytes before the new data: any match at most this long is
# found however the bytes were split into appends (a match that only completes later
# than SCAN_OVERLAP bytes after its start may be missed; real patterns are a few lines).
SCAN_OVERLAP = 16 << 10


def parse_window(window) -> int:
    """The console window in bytes, from an int or a size string ("4M", "64K").
    ConfigError when not understood or smaller than MIN_WINDOW."""
    if isinstance(window, bool) or not isinstance(window, (int, str)):
        raise ConfigError(f"console_window must be a byte count or a size like '4M', not {window!r}")
    try:
        value = parse_size(window) if isinstance(window, str) else window
    except ConfigError:
        raise ConfigError(f"console_window {window!r} is not understood; use e.g. '4M' or '512K'") from None
    if value < MIN_WINDOW:
        raise ConfigError(f"console_window {window!r} is below the minimum of {MIN_WINDOW} bytes")
    return value


def open_log_file(path) -> "object":
    """`path` opened for the whole console: created or truncated, write-only, unbuffered,
    owner-only (vmm.hostio.open_private: mode 0600, also when the file existed);
    ConfigError naming the path."""
    try:
        return open_private(os.fspath(path), buffering=0)
    except (OSError, TypeError, ValueError) as e:
        raise ConfigError(f"console log file {path!r}: {e}") from None


class ConsoleLog:
    """The guest's console output: a bounded window in memory, the whole of it optionally
    streamed to a file, forwarded, scanned for a panic, waited on."""

    def __init__(self, out: Callable[[bytes], None] | None = None,
                 window: int | str = DEFAULT_WINDOW, path=None):
        self.out = out
        self.window = parse_window(window)
        self.path = None if path is None else os.fspath(path)
        self._file = None if path is None else open_log_file(path)
        self.file_error: str | None = None  # why streaming to the file stopped, if it did
        self._data = bytearray()  # the window: bytes [self._base, self.total)
        self._base = 0
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self._file_lock = threading.Lock()  # the file gets chunks in the window's order

    @property
    def total(self) -> int:
        """Bytes seen since the start (the absolute offset of the next byte)."""
        return self._base + len(self._data)

    @property
    def dropped(self) -> int:
        """Bytes dropped from the front of the window (the window's absolute start)."""
        return self._base

    def append(self, data: bytes) -> bool:
        """Adds `data` (the window drops its oldest bytes past `window`; the file, if
        any, gets everything); True when a kernel panic line has just arrived."""
        with self._file_lock:
            with self.changed:
                carry = bytes(self._data[-(len(PANIC_MARKER) - 1):])  # a marker split in two
                self._data += data
                excess = len(self._data) - self.window
                if excess > 0:
                    del self._data[:excess]  # bytearray moves its start: no copy each time
                    self._base += excess
                panicked = PANIC_MARKER in carry + data[:len(PANIC_MARKER) - 1] or PANIC_MARKER in data
                self.changed.notify_all()
            self._write_file(data)
        if self.out is not None:
            try:
                self.out(data)
            except Exception:  # a broken console sink must not kill the pump
                self.out = None
        return panicked

    def _write_file(self, data: bytes) -> None:
        f = self._file
        if f is None or not data:
            return
        view = memoryview(data)
        try:
            while view:
                n = f.write(view)
                view = view[n:]
        except (OSError, ValueError) as e:  # disk full, closed: keep running without it
            self.file_error = f"{type(e).__name__}: {e}"
            self._file = None
        finally:
            view.release()

    def close(self) -> None:
        """Closes the log file (later appends only reach the window)."""
        with self._file_lock:
            f, self._file = self._file, None
        if f is not None:
            f.close()

    def notify(self) -> None:
        """Wake every waiter on `changed`."""
        with self.changed:
            self.changed.notify_all()

    def text(self) -> str:
        """The window (the last `window` bytes; everything when nothing was dropped),
        decoded (invalid UTF-8 replaced). The whole log is in the file at `path`."""
        with self._lock:
            return self.text_locked()

    def text_locked(self) -> str:
        """The window's text, for a caller that holds `changed`."""
        return self._data.decode("utf-8", "replace")

    def as_bytes(self) -> bytes:
        """The window, as bytes (its first byte is at absolute offset `dropped`)."""
        with self._lock:
            return bytes(self._data)

    def tail(self, nbytes: int) -> str:
        """The last `nbytes` bytes (at most the window), decoded."""
        with self._lock:
            return bytes(self._data[-nbytes:]).decode("utf-8", "replace")

    def decode_from_locked(self, offset: int) -> tuple[int, str]:
        """(start, text): the window from absolute `offset` (moved up to the window's
        start, and back to a character's first byte) to its end, decoded."""
        start = max(offset, self._base)
        i = start - self._base
        for _ in range(3):  # not in the middle of a UTF-8 sequence
            if 0 < i < len(self._data) and 0x80 <= self._data[i] < 0xC0:
                i -= 1
        return self._base + i, self._data[i:].decode("utf-8", "replace")

    def panic_line(self) -> str:
        """The console's last kernel-panic line (the VM's exit detail)."""
        text = self.text()
        i = text.rfind(PANIC_MARKER.decode())
        return text[i:].splitlines()[0] if i >= 0 else "kernel panic"

    def scan(self, pattern: str | re.Pattern, start: int = 0) -> "ConsoleScan":
        """An incremental search for `pattern` from absolute offset `start`."""
        return ConsoleScan(self, pattern, start)


class ConsoleScan:
    """One regex searched in a ConsoleLog as it grows, each search scanning only the
    bytes that arrived since the previous one (plus SCAN_OVERLAP before them, and one
    byte of context so that `^`, `\\b` and one-character lookbehinds see what precedes).

    Matches are those a search of the whole text from `start` would find, for matches
    up to SCAN_OVERLAP bytes long that are still in the window when searched. The
    returned match is made on the piece scanned (`match.string`); `start_offset` and
    `end_offset` give its absolute byte offsets in the console stream."""

    def __init__(self, log: ConsoleLog, pattern: str | re.Pattern, start: int = 0,
                 overlap: int = SCAN_OVERLAP):
        self.log = log
        self.regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        self.start = max(0, start)
        self.overlap = overlap
        self._scanned: int | None = None  # absolute end of what the last search saw
        self.scanned_bytes = 0  # bytes decoded and searched so far (for tests and figures)
        self.missed_bytes = 0  # bytes dropped from the window before this scan saw them
        self.start_offset: int | None = None
        self.end_offset: int | None = None

    def search(self) -> re.Match | None:
        """The first match among the bytes not yet searched (and the overlap), or None."""
        with self.log.changed:
            return self.search_locked()

    def search_locked(self) -> re.Match | None:
        """search(), for a caller that holds the log's `changed`."""
        log = self.log
        end = log.total
        if self._scanned is not None and self._scanned >= end:
            return None  # nothing new since the last search
        fresh = self.start if self._scanned is None else max(self.start, self._scanned)
        if fresh > end:
            return None  # `start` lies ahead of what arrived
        if fresh < log.dropped:  # the window moved past bytes this scan never saw
            self.missed_bytes += log.dropped - fresh
        begin = self.start if self._scanned is None else max(self.start, self._scanned - self.overlap)
        self._scanned = end
        # One byte more in front: context for ^, \b and lookbehinds (not searched from).
        context = 1 if begin > log.dropped else 0
        first, text = log.decode_from_locked(begin - context)
        self.scanned_bytes += end - first
        match = self.regex.search(text, 1 if context and text else 0)
        if match is not None:
            self.start_offset = first + len(text[:match.start()].encode("utf-8", "replace"))
            self.end_offset = self.start_offset + len(match.group(0).encode("utf-8", "replace"))
        return match


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
