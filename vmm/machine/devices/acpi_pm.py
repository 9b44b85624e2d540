"""The ACPI PM1a event and control registers: what a non-reduced FADT must point at.

Linux (ACPICA) requires PM1a_EVT_BLK and PM1a_CNT_BLK in a full FADT. Nothing here ever
raises an event, so the SCI never fires. PM1_CNT reads with SCI_EN set, which tells the
OS the machine is already in ACPI mode (there is no SMI command port). Writing SLP_EN
with a sleep type asks for that sleep state: the DSDT's \\_S5 says type 5 is soft-off,
so `poweroff` in the guest calls `sleep(5)`.

Event block layout (4 bytes): PM1_STS (u16, write 1 to clear), PM1_EN (u16).
Control block (2 bytes): PM1_CNT.
"""

from __future__ import annotations

from typing import Callable

PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_TYP_MASK = 0x7 << PM1_CNT_SLP_TYP_SHIFT
PM1_CNT_SLP_EN = 1 << 13
SLP_TYP_S5 = 5  # matches the \_S5 package in tables.dsdt()


class AcpiPm:
    """The PM1a event and control registers; a write of SLP_EN calls sleep(type)."""

    def __init__(self, event_port: int, control_port: int,
                 sleep: Callable[[int], None] | None = None):
        self.event_port = event_port
        self.control_port = control_port
        self.sleep = sleep or (lambda sleep_type: None)
        self.status = 0
        self.enable = 0
        self.control = PM1_CNT_SCI_EN

    def state(self) -> dict:
        """PM1 status, enable and control (for snapshots)."""
        return {"status": self.status, "enable": self.enable, "control": self.control}

    def restore(self, state: dict) -> None:
        """Takes back what state() gave; ValueError when a register is not 16 bits."""
        values = {k: state[k] for k in ("status", "enable", "control")}
        for k, v in values.items():
            if not isinstance(v, int) or not 0 <= v <= 0xFFFF:
                raise ValueError(f"ACPI PM state: {k}={v!r} is not a 16-bit register")
        self.status, self.enable, self.control = values["status"], values["enable"], values["control"]

    def _registers(self) -> bytearray:
        return bytearray(self.status.to_bytes(2, "little") + self.enable.to_bytes(2, "little"))

    def io_in(self, port: int, size: int = 1) -> int:
        if self.event_port <= port < self.event_port + PM1_EVT_LEN:
            regs = self._registers()
            offset = port - self.event_port
            return int.from_bytes(regs[offset:offset + size].ljust(size, b"\xff"), "little")
        if self.control_port <= port < self.control_port + PM1_CNT_LEN:
            shift = 8 * (port - self.control_port)
            return (self.control >> shift) & ((1 << (8 * size)) - 1)
        return (1 << (8 * size)) - 1

    def io_out(self, port: int, size: int, value: int) -> None:
        if self.event_port <= port < self.event_port + PM1_EVT_LEN:
            offset = port - self.event_port
            for i in range(size):
                byte = (value >> (8 * i)) & 0xFF
                at = offset + i
                if at < 2:  # status: write 1 to clear
                    self.status &= ~(byte << (8 * at))
                elif at < 4:
                    mask = 0xFF << (8 * (at - 2))
                    self.enable = (self.enable & ~mask) | (byte << (8 * (at - 2)))
            return
        if self.control_port <= port < self.control_port + PM1_CNT_LEN:
            shift = 8 * (port - self.control_port)
            mask = ((1 << (8 * size)) - 1) << shift
            value = ((value << shift) & mask) | (self.control & ~mask)
            self.control = (value & ~PM1_CNT_SLP_EN) | PM1_CNT_SCI_EN
            if value & PM1_CNT_SLP_EN:
                self.sleep((value & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT)
