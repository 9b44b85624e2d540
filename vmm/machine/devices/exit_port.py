"""Port 0xf4: the guest ends the VM with an exit code (QEMU isa-debug-exit's port).

An out of 1, 2 or 4 bytes calls `on_exit(value & 0xff)`; our VMM uses the value as is
(QEMU would exit with (value << 1) | 1). Reads return 0.
"""

from __future__ import annotations

from typing import Callable


class ExitPort:
    """The exit port: the first write ends the VM with that code."""

    def __init__(self, on_exit: Callable[[int], None] | None = None):
        self.on_exit = on_exit or (lambda code: None)
        self.exit_code: int | None = None

    def state(self) -> dict:
        """The exit code written so far, if any (for snapshots)."""
        return {"exit_code": self.exit_code}

    def restore(self, state: dict) -> None:
        """Takes back what state() gave (without calling on_exit again)."""
        code = state["exit_code"]
        self.exit_code = None if code is None else int(code) & 0xFF

    def io_in(self, port: int, size: int = 1) -> int:
        return 0

    def io_out(self, port: int, size: int, value: int) -> None:
        if self.exit_code is None:  # the first exit wins (several vCPUs may race)
            self.exit_code = value & 0xFF
            self.on_exit(self.exit_code)
