"""Each device model's state() / restore(): a new device given an old one's state
answers the guest as the old one would (for snapshots)."""

import json

import pytest

from vmm.machine.devices import ReportPort, Serial16550
from vmm.machine.devices.acpi_pm import AcpiPm
from vmm.machine.devices.exit_port import ExitPort
from vmm.machine.devices.i8042 import CMD_READ_OUTPUT_PORT, COMMAND_PORT, DATA_PORT, I8042

BASE = 0x3F8


def test_serial_state_round_trip_keeps_registers_and_queued_bytes():
    old = Serial16550(BASE)
    old.io_out(BASE + 3, 1, 0x83)  # DLAB on
    old.io_out(BASE + 0, 1, 0x01)  # divisor 1
    old.io_out(BASE + 3, 1, 0x03)
    old.io_out(BASE + 1, 1, 0x01)  # RDI
    old.io_out(BASE + 7, 1, 0x5A)
    old.feed(b"hello")
    state = json.loads(json.dumps(old.state()))
    fast = []
    new = Serial16550(BASE, fast_path_changed=fast.append)
    new.restore(state)
    assert new.state() == old.state()
    assert fast == [False]  # a byte waits: the C fast path must hand LSR reads up
    assert bytes(new.io_in(BASE, 1) for _ in range(5)) == b"hello"
    assert new.io_in(BASE + 7, 1) == 0x5A


def test_serial_restore_refuses_bad_state():
    s = Serial16550(BASE)
    state = s.state()
    with pytest.raises(ValueError, match="ier=300"):
        s.restore({**state, "ier": 300})
    with pytest.raises(KeyError):
        s.restore({k: v for k, v in state.items() if k != "lcr"})


def test_small_devices_round_trip():
    k = I8042()
    k.io_out(COMMAND_PORT, 1, CMD_READ_OUTPUT_PORT)
    k2 = I8042()
    k2.restore(json.loads(json.dumps(k.state())))
    assert k2.io_in(DATA_PORT) == 0x01

    pm = AcpiPm(0x600, 0x604)
    pm.io_out(0x602, 2, 0x21)
    pm2 = AcpiPm(0x600, 0x604)
    pm2.restore(pm.state())
    assert pm2.state() == pm.state() and pm2.io_in(0x602, 2) == 0x21

    r = ReportPort()
    r.io_out(0, 4, 7, vcpu=1)
    r2 = ReportPort()
    r2.restore(json.loads(json.dumps(r.state())))
    assert r2.reports == [(1, 7)]

    codes = []
    e = ExitPort(on_exit=codes.append)
    e.restore({"exit_code": None})
    e.io_out(0, 1, 3)
    assert codes == [3]
