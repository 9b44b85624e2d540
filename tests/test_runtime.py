"""vCPU thread exit dispatch, the COM1 fast path and the console pump, on real KVM."""

from __future__ import annotations

import pytest

from tinyvm import COUNT, HELLO, RecordingHandler, TinyVm, wait_until

pytestmark = pytest.mark.kvm

# Assembled with GNU as (.code16, linked at 0x1000).
REP_OUTSB = bytes.fromhex(  # rep outsb "hello\n" to 0x3f8, then out %al,0xf4; hlt
    "be1110b90600baf803fcf36ebaf400eef468656c6c6f0a")
MMIO = bytes.fromhex(  # movb $0x55 -> 0x20000; movw 0x20004 -> ax; out %ax,0xf4 (2 bytes)
    "b800208ec026c60600005526a10400baf400eff4")
READ_LSR = bytes.fromhex("bafd03ecbaf400eef4")  # in 0x3fd -> al; out %al,0xf4; hlt


class StopOnExitPort(RecordingHandler):
    """Ends the VM on an out to 0xf4, like the machine's exit port."""

    def __init__(self, vm):
        super().__init__()
        self.vm = vm
        self.mmio = []

    def io_out(self, i, port, size, value):
        super().io_out(i, port, size, value)
        if port == 0xF4:
            from vmm.runtime import request_stop

            request_stop(self.vm)

    def mmio_read(self, i, addr, size):
        self.mmio.append(("r", addr, size))
        return 0xBEEF

    def mmio_write(self, i, addr, size, value):
        self.mmio.append(("w", addr, size, value))


def run_to_exit(code, fast, mem_size=2 << 20):
    from vmm.runtime import ConsolePump

    with TinyVm(code, mem_size=mem_size) as g:
        g.vm.set_serial_fast(fast)
        h = StopOnExitPort(g.vm)
        got = []
        pump = ConsolePump(g.vm, got.append)
        pump.start()
        g.start(h)
        assert h.stopped.wait(20), "guest did not reach the exit port"
        pump.stop()
        assert not pump.is_alive()
        g.threads[0].join(5)
        return h, b"".join(got), g.vcpus[0].native.fast_exits


def test_hello_fast_path_goes_to_ring_not_python():
    h, console, fast_exits = run_to_exit(HELLO, fast=True)
    assert console == b"hello\n"
    assert h.outs == [(0, 0xF4, 1, 0x2A)]  # only the exit port reached Python
    assert h.stops[0][0] == "stopped"
    assert fast_exits == 6


def test_hello_slow_path_reaches_python_handler():
    h, console, _ = run_to_exit(HELLO, fast=False)
    assert console == b""
    assert bytes(v for (_, port, _, v) in h.outs if port == 0x3F8) == b"hello\n"
    assert h.outs[-1] == (0, 0xF4, 1, 0x2A)


def test_rep_outsb_is_dispatched_item_by_item():
    h, _, _ = run_to_exit(REP_OUTSB, fast=False)
    assert bytes(v for (_, port, _, v) in h.outs if port == 0x3F8) == b"hello\n"


def test_rep_outsb_fast_path():
    h, console, _ = run_to_exit(REP_OUTSB, fast=True)
    assert console == b"hello\n"


def test_lsr_read_answered_in_c_when_fast():
    h, _, _ = run_to_exit(READ_LSR, fast=True)
    assert h.outs == [(0, 0xF4, 1, 0x60)]
    h, _, _ = run_to_exit(READ_LSR, fast=False)  # the handler answers 0xff for unknown ports
    assert h.outs == [(0, 0xF4, 1, 0xFF)]


def test_mmio_write_and_read_outside_ram():
    h, _, _ = run_to_exit(MMIO, fast=False, mem_size=0x10000)
    assert h.mmio == [("w", 0x20000, 1, 0x55), ("r", 0x20004, 2)]
    assert h.outs == [(0, 0xF4, 2, 0xBEEF)]


def test_request_stop_ends_running_loop_promptly():
    with TinyVm(COUNT, ncpus=2) as g:
        h = RecordingHandler()
        g.start(h)
        assert wait_until(lambda: g.counter(1) > 10)
        from vmm.runtime import request_stop

        request_stop(g.vm)
        assert h.stopped.wait(5)
        assert {r for r, _ in h.stops.values()} == {"stopped"}


def test_handler_exception_stops_vcpu_with_error():
    class Broken(RecordingHandler):
        def io_out(self, i, port, size, value):
            raise RuntimeError("device bug")

    with TinyVm(HELLO) as g:
        h = Broken()
        g.start(h)
        assert h.stopped.wait(10)
        reason, detail = h.stops[0]
        assert reason == "error" and "device bug" in detail


def test_console_pump_push_keeps_order_with_ring():
    from vmm.runtime import ConsolePump

    with TinyVm(COUNT) as g:
        got = []
        pump = ConsolePump(g.vm, got.append)
        pump.push(b"slow ")
        pump.start()
        pump.push(b"path")
        assert wait_until(lambda: b"".join(got) == b"slow path", timeout=5)
        pump.stop()
        assert pump.dropped == 0


def test_console_pump_sleeps_without_data():
    from vmm.runtime import ConsolePump
    from vmm.runtime.freeze import thread_syscall_number

    with TinyVm(COUNT) as g:
        pump = ConsolePump(g.vm, lambda b: None)
        pump.start()
        assert wait_until(lambda: thread_syscall_number(pump.native_id) == 202, timeout=5)  # futex
        pump.stop()


def test_hlt_without_irqchip_reaches_python():
    # `cli; hlt` exits to user space only without the in-kernel irqchip.
    from tinyvm import CLI_HLT

    class CountHlt(RecordingHandler):
        hlts = 0

        def on_hlt(self, i):
            self.hlts += 1
            return self.hlts < 3  # re-enter twice, then stop

    with TinyVm(CLI_HLT, irqchip=False) as g:
        h = CountHlt()
        g.start(h)
        assert h.stopped.wait(10)
        assert h.hlts == 3 and h.stops[0][0] == "hlt"

    with TinyVm(CLI_HLT, irqchip=False) as g:  # a handler without on_hlt: the vCPU stops
        h = RecordingHandler()
        g.start(h)
        assert h.stopped.wait(10)
        assert h.stops[0][0] == "hlt"
