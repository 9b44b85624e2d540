"""Requests from the guest: a line protocol on COM2 (/dev/ttyS1 in Linux), served by
handlers the host registers with ``Machine.on_request(name, handler)``.

Protocol (docs/requests.md; kernels/init/vmm-request.c is the guest's client):

* request, guest -> host: one line ``<id> <name> [args...]\\n`` of printable ASCII
  (0x20-0x7e; a trailing ``\\r`` is dropped, an empty line ignored), at most
  MAX_LINE bytes with the newline; words are separated by spaces. ``id`` and ``name``
  are 1-64 characters of ``[A-Za-z0-9_.:-]``.
* reply, host -> guest: one line ``<id> ok[ <text>]\\n`` or ``<id> error <message>\\n``,
  at most MAX_LINE bytes. The id is the request's; ``-`` when the line had none that
  could be read. Every line gets exactly one reply, in order.
* a malformed line, an oversized one (discarded up to its newline), an unknown name,
  a handler that raises, a freeze that fails: an error reply naming the problem. The
  host never fails because of what the guest sent; nothing is written to the guest
  before a handler runs, and a handler's bad Op batch is refused whole (vmm.ops).

Threads: the UART's bytes arrive on vCPU threads, which only cut them into lines
(LineAssembler) and queue them; ONE worker thread serves the lines in order: it freezes
every vCPU (one rendezvous; a vCPU thread cannot freeze: it would wait for itself),
calls ``handler(context, request)``, thaws, and feeds the reply into COM2's receiver
(an RDI interrupt in the guest). At most MAX_PENDING lines wait; more are dropped
(counted in ``dropped``) and get no reply.
"""

from __future__ import annotations

import queue
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from vmm.errors import GuestRequestError, VmmError

# What the guest can make the host keep is bounded: the line being assembled (at most
# MAX_LINE bytes; an oversized one keeps only its 80-byte head and a count), MAX_PENDING
# queued lines of at most MAX_LINE each, and HISTORY (line, reply) pairs of at most
# MAX_LINE each: about (1 + MAX_PENDING + 2 * HISTORY) * MAX_LINE = 780 KiB in all.
MAX_LINE = 4096  # bytes of a request or reply line, newline included
MAX_PENDING = 64  # lines waiting for the worker
HISTORY = 64  # (request line, reply) pairs kept for tests and failure reports
TOKEN_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
NO_ID = "-"


@dataclass(frozen=True)
class Request:
    """One request from the guest: ``id``, ``name``, ``args`` (the words after the name)
    and the whole ``line``. ``kwargs``: the ``key=value`` args as a dict."""

    id: str
    name: str
    args: list[str]
    line: str
    kwargs: dict[str, str] = field(default_factory=dict)

    def int_arg(self, key: str) -> int:
        """``key=N`` as an int (decimal or 0x-hex); GuestRequestError naming it otherwise."""
        if key not in self.kwargs:
            raise GuestRequestError(f"{self.name}: missing argument {key}=N")
        try:
            return int(self.kwargs[key], 0)
        except ValueError:
            raise GuestRequestError(f"{self.name}: {key}={self.kwargs[key]!r} is not a number") from None


@dataclass
class RequestContext:
    """What a runtime-level handler gets: the machine (frozen unless the handler was
    registered with freeze=False) and the freeze's snapshot (None then)."""

    machine: Any
    snapshot: Any = None


class Oversized:
    """A line the assembler discarded for passing MAX_LINE; ``head`` is its start."""

    def __init__(self, head: bytes, length: int):
        self.head = head
        self.length = length


class LineAssembler:
    """Bytes -> complete lines (without the newline), cheaply, on the vCPU thread. A line
    longer than MAX_LINE is discarded up to its newline and comes out as Oversized."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = 0  # bytes discarded so far of an oversized line
        self._head = b""

    def feed(self, data: bytes) -> list:
        out: list = []
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            chunk = data[start:] if nl < 0 else data[start:nl]
            if self._discarding:
                self._discarding += len(chunk)
            else:
                self._buf += chunk
                if len(self._buf) + 1 > self.max_line:  # the newline counts
                    self._head = bytes(self._buf[:80])
                    self._discarding = len(self._buf)
                    self._buf.clear()
            if nl < 0:
                break
            if self._discarding:
                out.append(Oversized(self._head, self._discarding + 1))
                self._discarding = 0
            else:
                out.append(bytes(self._buf))
                self._buf.clear()
            start = nl + 1
        return out


def parse_line(raw: bytes) -> Request:
    """A request line (no newline) -> Request; GuestRequestError (with ``.request_id``,
    the id when one could be read) for a malformed one."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    words = raw.split(b" ")
    rid = _request_id(raw)
    for i, b in enumerate(raw):
        if not 0x20 <= b <= 0x7E:
            raise _malformed(rid, f"byte {b:#04x} at column {i + 1} is not printable ASCII")
    words = [w.decode() for w in words if w]
    if not words or rid == NO_ID:
        raise _malformed(NO_ID, "expected '<id> <name> [args...]'; the id must be 1-64 of "
                                "[A-Za-z0-9_.:-]")
    if len(words) < 2:
        raise _malformed(rid, "no request name after the id")
    name = words[1]
    if not TOKEN_RE.match(name):
        raise _malformed(rid, f"request name {name[:64]!r} is not 1-64 of [A-Za-z0-9_.:-]")
    args = words[2:]
    kwargs = dict(a.split("=", 1) for a in args if "=" in a)
    return Request(rid, name, args, raw.decode(), kwargs)


def _request_id(line: bytes) -> str:
    """The line's first word when it is a valid id, else NO_ID."""
    first = line.split(b" ", 1)[0].decode("ascii", "replace")
    return first if TOKEN_RE.match(first) else NO_ID


def _malformed(rid: str, message: str) -> GuestRequestError:
    e = GuestRequestError(f"malformed request: {message}")
    e.request_id = rid
    return e


def format_reply(rid: str, ok: bool, text: str = "") -> bytes:
    """``<id> ok[ text]\\n`` / ``<id> error <text>\\n``: one line of printable ASCII
    (anything else becomes '?', newlines spaces), cut to MAX_LINE bytes."""
    text = "" if text is None else str(text)
    clean = "".join(c if " " <= c <= "~" else (" " if c in "\r\n\t" else "?") for c in text).strip()
    head = f"{rid} {'ok' if ok else 'error'}"
    if not ok and not clean:
        clean = "failed"
    line = f"{head} {clean}" if clean else head
    return line.encode()[:MAX_LINE - 1] + b"\n"


Handler = Callable[[Any, Request], Any]


class RequestChannel:
    """The host's end: handlers by name, the line assembler, the worker thread.

    ``serve(handler_entry, request)`` runs one request (the machine's: freeze, call,
    thaw) and returns the reply text; ``reply(bytes)`` sends a reply to the guest."""

    def __init__(self, serve: Callable[["HandlerEntry", Request], Any],
                 reply: Callable[[bytes], None]):
        self._serve = serve
        self._reply = reply
        self._handlers: dict[str, HandlerEntry] = {}
        self._lock = threading.Lock()
        self._assembler = LineAssembler()
        self._queue: queue.Queue = queue.Queue(MAX_PENDING)
        self._worker: Optional[threading.Thread] = None
        self._closed = False
        self.dropped = 0  # lines dropped while MAX_PENDING waited
        self.history: deque = deque(maxlen=HISTORY)  # (line as str, reply bytes)
        self.served = 0

    # --- host API ---------------------------------------------------------------------
    def on_request(self, name: str, handler: Optional[Handler], freeze: bool = True) -> None:
        """Serve requests named ``name`` with ``handler(context, request)``; it returns
        the reply text (None: none) or raises (an error reply with its message).
        ``handler=None`` removes it."""
        if not isinstance(name, str) or not TOKEN_RE.match(name):
            raise GuestRequestError(f"request name {name!r}: expected 1-64 of [A-Za-z0-9_.:-]")
        if handler is not None and not callable(handler):
            raise GuestRequestError(f"the handler for {name!r} is not callable: {handler!r}")
        with self._lock:
            if handler is None:
                self._handlers.pop(name, None)
            else:
                self._handlers[name] = HandlerEntry(name, handler, freeze)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._handlers)

    # --- guest side (vCPU threads) ------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes the guest sent on COM2: complete lines go to the worker."""
        if self._closed:
            return
        for line in self._assembler.feed(data):
            if isinstance(line, bytes) and not line.strip(b"\r"):
                continue  # an empty line: nothing asked
            self._start_worker()
            try:
                self._queue.put_nowait(line)
            except queue.Full:
                self.dropped += 1

    # --- the worker -------------------------------------------------------------------
    def handle(self, line) -> bytes:
        """One line (bytes or Oversized) -> its reply; never raises."""
        rid = NO_ID
        try:
            if isinstance(line, Oversized):
                rid = _request_id(line.head)
                return format_reply(rid, False, f"request too long: {line.length} bytes, at most "
                                                f"{MAX_LINE} with the newline; discarded")
            request = parse_line(line)
            rid = request.id
            with self._lock:
                entry = self._handlers.get(request.name)
                known = sorted(self._handlers)
            if entry is None:
                return format_reply(rid, False, f"unknown request {request.name!r}; the host serves: "
                                                f"{', '.join(known) or 'nothing (no handler registered)'}")
            result = self._serve(entry, request)
            return format_reply(rid, True, "" if result is None else str(result))
        except GuestRequestError as e:
            return format_reply(getattr(e, "request_id", rid), False, str(e))
        except VmmError as e:
            return format_reply(rid, False, f"{type(e).__name__}: {e}")
        except Exception as e:  # a handler's own bug must not take the host down
            return format_reply(rid, False, f"the handler raised {type(e).__name__}: {e}")

    def _start_worker(self) -> None:
        if self._worker is None:
            with self._lock:
                if self._worker is None and not self._closed:
                    self._worker = threading.Thread(target=self._run, name="vmm-requests", daemon=True)
                    self._worker.start()

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            if line is None or self._closed:
                return
            reply = self.handle(line)
            text = line.decode("ascii", "replace") if isinstance(line, bytes) else \
                f"<{line.length} bytes discarded>"
            self.history.append((text, reply))
            self.served += 1
            if self._closed:
                return
            try:
                self._reply(reply)
            except VmmError:
                return  # the VM is gone

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (after the request it serves now)."""
        self._closed = True
        worker = self._worker
        if worker is None:
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if worker is not threading.current_thread():
            worker.join(timeout)


@dataclass(frozen=True)
class HandlerEntry:
    name: str
    handler: Handler
    freeze: bool = True
