"""The bit of an i8042 keyboard controller a VM needs: the reset line.

Linux's `reboot=k` writes 0xFE ("pulse output line 0": CPU reset) to the command port
0x64; that calls `reset()`. There is no keyboard behind it, and the status port says
so the way Linux's i8042 driver recognises at once: the output buffer is always full
(bit 0) and reading it never empties it, so the driver's flush gives up after 16 reads
("i8042: No controller found"). The input buffer is always empty (bit 1 clear), so
`reboot=k` (kb_wait, then 0xFE) resets without waiting.

A status of "both buffers empty" looks like a controller that never answers: a kernel
without ACPI PNP (where the FADT's no-8042 flag is not consulted) then polls for the
control register's value 10,000 times, 50 us apart ("Can't read CTR while initializing
i8042"): half a second of every boot on hardware, and 10,000 exits to us.
"""

from __future__ import annotations

from typing import Callable

# The ports are the port map's (vmm.machine.layout); named here as the device knows them.
from vmm.machine.layout import I8042_COMMAND_PORT as COMMAND_PORT
from vmm.machine.layout import I8042_DATA_PORT as DATA_PORT  # noqa: F401

CMD_PULSE_RESET = 0xFE
CMD_READ_OUTPUT_PORT = 0xD0
# Bytes waiting in the data port: a real controller holds one; a guest that asks without
# reading gets no more than this many queued.
OUTPUT_LIMIT = 16
STATUS_OUTPUT_FULL = 0x01  # a byte waits in the data port
STATUS_SYSTEM_FLAG = 0x04  # set after a successful self-test (POST done)


class I8042:
    """An i8042 that only resets: 0xFE to the command port calls reset()."""

    def __init__(self, reset: Callable[[], None] | None = None):
        self.reset = reset or (lambda: None)
        self.reset_requests = 0
        self._output: list[int] = []

    def state(self) -> dict:
        """The bytes waiting in the data port and the reset count (for snapshots)."""
        return {"output": list(self._output), "reset_requests": self.reset_requests}

    def restore(self, state: dict) -> None:
        """Takes back what state() gave; ValueError when it is out of range."""
        output = [int(b) & 0xFF for b in state["output"]]
        if len(output) > OUTPUT_LIMIT:
            raise ValueError(f"i8042 state: {len(output)} queued bytes exceed {OUTPUT_LIMIT}")
        self._output = output
        self.reset_requests = int(state["reset_requests"])

    def io_in(self, port: int, size: int = 1) -> int:
        if port == COMMAND_PORT:
            # Output buffer full, input buffer empty: "no controller" (see above).
            return STATUS_SYSTEM_FLAG | STATUS_OUTPUT_FULL
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
        elif value == CMD_READ_OUTPUT_PORT and len(self._output) < OUTPUT_LIMIT:
            self._output.append(0x01)  # output port: system reset line inactive (high)
