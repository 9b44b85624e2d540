"""Why a VM ended: VmExit and the exit code a crash reports (their one home).

`wait()` returns a VmExit whose reason is one of "exit-code", "reset", "shutdown",
"timeout", "internal-error", "panic", "stopped". "stopped" (exit code 0) is the host's
stop() or the guest's ACPI power-off (S5). The exit code is the guest's own for
"exit-code", 0 for "reset" and "stopped", else EXIT_CODE_CRASH (what the CLI exits with).
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_CODE_CRASH = 255  # panic, shutdown, internal error, timeout (as the CLI reports them)
REASONS = ("exit-code", "reset", "shutdown", "timeout", "internal-error", "panic", "stopped")


@dataclass(frozen=True)
class VmExit:
    """Why the VM ended: reason (see REASONS), exit code, a one-line detail and the
    console's last bytes."""

    reason: str
    exit_code: int
    detail: str
    console_tail: str

    def __str__(self) -> str:
        return f"VM ended: {self.reason} (exit code {self.exit_code}): {self.detail}"
