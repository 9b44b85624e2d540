"""The bit of an i8042 keyboard controller a VM needs: the reset line.

Linux's `reboot=k` writes 0xFE ("pulse output line 0": CPU reset) to the command port
0x64; that calls `reset()`. Status reads say "no data, input buffer empty", so the
driver's polling loops finish at once; data port reads return 0.
"""

from __future__ import annotations

from typing import Callable

# The ports are the port map's (vmm.machine.layout); named here as the device knows them.
from vmm.machine.layout import I8042_COMMAND_PORT as COMMAND_PORT
from vmm.machine.layout import I8042_DATA_PORT as DATA_PORT  # noqa: F401

CMD_PULSE_RESET = 0xFE
CMD_READ_OUTPUT_PORT = 0xD0
STATUS_SYSTEM_FLAG = 0x04  # set after a successful self-test (POST done)


class I8042:
    """An i8042 that only resets: 0xFE to the command port calls reset()."""

    def __init__(self, reset: Callable[[], None] | None = None):
        self.reset = reset or (lambda: None)
        self.reset_requests = 0
        self._output: list[int] = []

    def io_in(self, port: int, size: int = 1) -> int:
        if port == COMMAND_PORT:
            # Output buffer full (bit 0) only while a reply is queued; input buffer empty.
            return STATUS_SYSTEM_FLAG | (1 if self._output else 0)
        if port == DATA_PORT and self._output:
            return self._output.pop(0)
        return 0

    def io_out(self, port: int, size: int, value: int) -> None:
        if port != COMMAND_PORT:
            return
        value &= 0xFF
        if value == CMD_PULSE_RESET:
            self.reset_requests += 1
            self.reset()
        elif value == CMD_READ_OUTPUT_PORT:
            self._output.append(0x01)  # output port: system reset line inactive (high)
