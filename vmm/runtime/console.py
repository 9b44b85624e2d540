"""The console pump: moves COM1 output from the C ring to a sink, without busy-polling.

vCPUs append bytes in C (fast path) or through `push()` (the Python 16550 slow path, so
both keep one order); the pump sleeps on a futex until the ring has data, drains it in
one call and hands the bytes to `sink(bytes)`.
"""

from __future__ import annotations

import threading
import time

from vmm.kvm.native import native

_DRAIN_CHUNK = 65536
# One hand-over to the sink is at most this much (the C ring holds 64 KiB; a guest that
# writes as fast as the pump drains cannot make one drain() grow without end).
_DRAIN_LIMIT = 16 * _DRAIN_CHUNK
_WAKE_INTERVAL_NS = 200_000_000  # re-check the stop flag this often even when idle
# After a wake-up, let output accumulate briefly: one drain per burst instead of a
# futex wake and a context switch per byte (which would slow the printing vCPU).
_BATCH_DELAY_S = 0.002


class ConsolePump(threading.Thread):
    """A thread that drains the C core's COM1 ring and hands the bytes to a sink."""

    def __init__(self, vm, sink):
        super().__init__(name="console-pump", daemon=True)
        self.vm_native = getattr(vm, "native", vm)
        self.sink = sink
        self._stopping = False
        ffi, _ = native()
        self._buf = ffi.new("uint8_t[]", _DRAIN_CHUNK)

    def push(self, data: bytes) -> None:
        """Appends bytes from Python (the 16550 slow path) to the same ring."""
        ffi, lib = native()
        if data:
            lib.vmm_serial_push(self.vm_native, ffi.from_buffer(bytes(data)), len(data))

    def drain(self, limit: int = _DRAIN_LIMIT) -> bytes:
        """What is pending now, up to about `limit` bytes (also usable without the
        thread running)."""
        ffi, lib = native()
        out = bytearray()
        while len(out) < limit:
            n = lib.vmm_serial_drain(self.vm_native, self._buf, _DRAIN_CHUNK)
            if n == 0:
                break
            out += ffi.buffer(self._buf, n)
        return bytes(out)

    @property
    def dropped(self) -> int:
        """Bytes lost because the ring was full (the sink was too slow)."""
        return self.vm_native.serial_dropped

    def run(self) -> None:
        """The thread: wait for COM1 bytes, drain them to the sink, until stop()."""
        _, lib = native()
        while not self._stopping:
            if lib.vmm_serial_wait(self.vm_native, _WAKE_INTERVAL_NS) and not self._stopping:
                time.sleep(_BATCH_DELAY_S)
            data = self.drain()
            if data:
                self.sink(data)
        for _ in range(16):  # the final drain (the vCPUs have stopped: one piece is all)
            data = self.drain()
            if not data:
                break
            self.sink(data)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops the pump after a final drain into the sink."""
        self._stopping = True
        native()[1].vmm_serial_wake(self.vm_native)
        if self.is_alive():
            self.join(timeout)
