"""Every buffer the guest feeds is bounded (issue 24): the report port, unclaimed-access
counts, the i8042's output queue, the UART's receive queue, the request channel's line
assembler and the console pump's hand-over."""

from vmm.machine.devices import I8042, ReportPort, Serial16550
from vmm.machine.devices.bus import MAX_MISS_ADDRESSES, MmioBus, PortBus
from vmm.machine.devices.i8042 import OUTPUT_LIMIT
from vmm.machine.devices.report_port import MAX_REPORTS
from vmm.machine.devices.serial import LSR_OE, RX_FIFO_LIMIT
from vmm.runtime.requests import MAX_LINE, LineAssembler, Oversized


def test_report_port_keeps_the_first_reports_and_counts_the_rest():
    r = ReportPort()
    for i in range(MAX_REPORTS + 10):
        r.io_out(0x600, 4, i, vcpu=0)
    assert len(r.reports) == MAX_REPORTS and r.dropped == 10
    assert r.reports[-1] == (0, MAX_REPORTS - 1)


def test_mmio_miss_counts_are_bounded():
    bus = MmioBus()
    for addr in range(MAX_MISS_ADDRESSES + 100):
        bus.read(0xD000_0000 + 8 * addr, 4)
    bus.read(0xD000_0000, 4)  # a known address still counts on its own
    assert len(bus.unhandled) == MAX_MISS_ADDRESSES and bus.unhandled_other == 100
    assert bus.unhandled[0xD000_0000] == 2
    ports = PortBus()
    for port in range(0x10000):
        ports.io_in(port, 1)
    assert len(ports.unhandled) == MAX_MISS_ADDRESSES and ports.unhandled_other == 0x10000 - MAX_MISS_ADDRESSES


def test_i8042_output_queue_is_bounded():
    k = I8042()
    for _ in range(1000):
        k.io_out(0x64, 1, 0xD0)
    assert [k.io_in(0x60) for _ in range(OUTPUT_LIMIT + 1)] == [1] * OUTPUT_LIMIT + [0]


def test_uart_loopback_queue_is_bounded():
    s = Serial16550()
    s.io_out(s.base + 4, 1, 0x10)  # MCR loopback: the guest's own bytes come back
    for _ in range(RX_FIFO_LIMIT + 5):
        s.io_out(s.base, 1, 0x41)
    assert len(s.rx) == RX_FIFO_LIMIT and s.io_in(s.base + 5) & LSR_OE


def test_line_assembler_keeps_at_most_a_line():
    a = LineAssembler()
    for _ in range(100):
        assert a.feed(b"x" * 10000) == []
        assert len(a._buf) < MAX_LINE
    (line,) = a.feed(b"\n")
    assert isinstance(line, Oversized) and line.length == 1_000_001 and len(line.head) == 80
