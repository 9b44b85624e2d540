"""Pure device state machines (no KVM code) and the buses that dispatch to them."""

from vmm.machine.devices.bus import MmioBus, PortBus
from vmm.machine.devices.exit_port import ExitPort
from vmm.machine.devices.i8042 import I8042
from vmm.machine.devices.report_port import ReportPort
from vmm.machine.devices.serial import Serial16550

__all__ = ["ExitPort", "I8042", "MmioBus", "PortBus", "ReportPort", "Serial16550"]
