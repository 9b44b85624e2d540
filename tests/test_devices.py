import pytest

from vmm.errors import ConfigError
from vmm.machine.devices import ExitPort, I8042, MmioBus, PortBus, ReportPort


def test_i8042_reset_and_status():
    resets = []
    k = I8042(reset=lambda: resets.append(1))
    # Input buffer empty (reboot=k writes at once), output buffer full however often the
    # data port is read: Linux's i8042 flush gives up after 16 reads ("No controller found").
    assert k.io_in(0x64, 1) & 0x03 == 0x01
    assert [k.io_in(0x60, 1) for _ in range(20)] == [0] * 20 and k.io_in(0x64, 1) & 1
    k.io_out(0x64, 1, 0xD0)
    assert k.io_in(0x60, 1) == 0x01 and k.io_in(0x64, 1) & 0x03 == 0x01
    k.io_out(0x60, 1, 0xFE)  # data port: not a reset
    assert resets == []
    k.io_out(0x64, 1, 0xFE)
    assert resets == [1] and k.reset_requests == 1


def test_exit_port_first_code_wins():
    codes = []
    e = ExitPort(on_exit=codes.append)
    e.io_out(0xF4, 4, 0x1234)
    e.io_out(0xF4, 1, 7)
    assert codes == [0x34] and e.exit_code == 0x34


def test_report_port_records_vcpu_and_value():
    r = ReportPort()
    r.io_out(0x600, 4, 0xDEADBEEF, vcpu=3)
    r.io_out(0x600, 1, 0x1FF, vcpu=0)
    assert r.reports == [(3, 0xDEADBEEF), (0, 0xFF)]
    assert r.wait_for(2, timeout=0) and not r.wait_for(3, timeout=0.01)


def test_port_bus_dispatch_and_unknown_ports():
    bus = PortBus()
    r = ReportPort()
    k = I8042()
    bus.register(0x600, 4, r)
    bus.register(0x60, 1, k)
    bus.register(0x64, 1, k)
    bus.io_out(0x600, 4, 5, vcpu=2)
    assert r.reports == [(2, 5)]
    assert bus.io_in(0x64, 1) == k.io_in(0x64, 1)
    assert bus.io_in(0x80, 1) == 0xFF and bus.io_in(0x80, 2) == 0xFFFF and bus.io_in(0x81, 4) == 0xFFFFFFFF
    bus.io_out(0x80, 1, 0)
    assert bus.unhandled == {0x80: 3, 0x81: 1}
    with pytest.raises(ConfigError, match="overlaps"):
        bus.register(0x602, 4, ExitPort())


def test_mmio_bus_unknown_reads_all_ones():
    bus = MmioBus()
    assert bus.read(0xD0000000, 4) == 0xFFFFFFFF
    bus.write(0xD0000000, 8, 1)
    assert bus.unhandled[0xD0000000] == 2


def test_acpi_pm_registers_and_poweroff():
    from vmm.machine.devices.acpi_pm import AcpiPm

    sleeps = []
    pm = AcpiPm(0x400, 0x404, sleep=sleeps.append)
    assert pm.io_in(0x404, 2) & 1  # SCI_EN: already in ACPI mode
    pm.io_out(0x402, 2, 0x0120)
    assert pm.io_in(0x402, 2) == 0x0120 and pm.io_in(0x400, 4) == 0x01200000
    pm.status = 0x8001
    pm.io_out(0x400, 2, 0x0001)  # write 1 to clear
    assert pm.io_in(0x400, 2) == 0x8000
    pm.io_out(0x404, 2, (5 << 10) | (1 << 13))
    assert sleeps == [5] and not pm.io_in(0x404, 2) & (1 << 13)
