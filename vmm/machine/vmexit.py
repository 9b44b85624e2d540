"""Why a VM ended and why a vCPU stopped: their one home.

`wait()` returns a VmExit whose reason is an ExitReason: "exit-code", "reset",
"shutdown", "timeout", "internal-error", "panic", "stopped". "stopped" (exit code 0) is
the host's stop() or the guest's ACPI power-off (S5). The exit code is the guest's own
for "exit-code", 0 for "reset" and "stopped", else EXIT_CODE_CRASH (what the CLI exits
with). A vCPU thread leaves its loop for a StopReason; the machine turns that into the
VM's ExitReason. Both are str-valued enums: they compare equal to (and print as) the
strings they replaced, so `exit.reason == "panic"` keeps working.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

EXIT_CODE_CRASH = 255  # panic, shutdown, internal error, timeout (as the CLI reports them)


class ExitReason(enum.StrEnum):
    """Why the VM ended (VmExit.reason)."""

    EXIT_CODE = "exit-code"  # the guest wrote its exit code to the exit port
    RESET = "reset"  # the guest asked for a reset (i8042, a reset system event)
    SHUTDOWN = "shutdown"  # triple fault or a shutdown system event
    TIMEOUT = "timeout"  # the machine's or wait()'s timeout passed
    INTERNAL_ERROR = "internal-error"  # KVM could not go on (or a vCPU thread failed)
    PANIC = "panic"  # the kernel's console said it panicked
    STOPPED = "stopped"  # the host's stop() or the guest's ACPI power-off


class StopReason(enum.StrEnum):
    """Why one vCPU thread left its run loop (VcpuThread.stop_reason)."""

    STOPPED = "stopped"  # the host asked for it
    ERROR = "error"  # KVM_RUN failed, an unexpected exit, or an exit handler raised
    INTERNAL_ERROR = "internal-error"
    SHUTDOWN = "shutdown"
    FAIL_ENTRY = "fail-entry"
    SYSTEM_EVENT = "system-event"
    HLT = "hlt"  # halted with no in-kernel irqchip


REASONS = tuple(r.value for r in ExitReason)


@dataclass(frozen=True)
class VmExit:
    """Why the VM ended: reason, exit code, a one-line detail and the console's last bytes."""

    reason: ExitReason
    exit_code: int
    detail: str
    console_tail: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", ExitReason(self.reason))

    def __str__(self) -> str:
        return f"VM ended: {self.reason} (exit code {self.exit_code}): {self.detail}"
