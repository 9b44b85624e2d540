"""Machine: the one way to build, run, freeze and stop a VM.

The assembly (options, build steps, devices, exit dispatch, why the VM ended) is
vmm.machine.builder.MachineBuilder; this floor adds what runs: the vCPU threads, the
console pump, the freeze coordinator and the timeout timer. `start` is the last build
step (see BUILD_STEPS); its body is `_start`.
"""

from __future__ import annotations

import threading
import time

from vmm.errors import VmmError
from vmm.machine.builder import EXIT_CODE_CRASH, MachineBuilder, VmExit
from vmm.runtime.console import ConsolePump
from vmm.runtime.freeze import FreezeCoordinator
from vmm.runtime.vcpu_thread import VcpuThread, request_stop


class Machine(MachineBuilder):
    """A KVM virtual machine running one kernel; see docs/CONTRACTS.md."""

    def start(self) -> "Machine":
        """Builds (if not yet built) and starts the vCPU threads; returns at once."""
        if self.started_at is not None:
            raise VmmError("this Machine was already started; build a new one")
        try:
            if self.vm is None:
                self.build()
            self._run_step("start")
        except BaseException:
            self._teardown()
            raise
        return self

    def wait(self, timeout: float | None = None) -> VmExit:
        """Blocks until the VM ends and returns why. When `timeout` seconds pass first the
        VM is stopped with reason "timeout". Threads are joined and KVM resources freed."""
        if self.started_at is None:
            raise VmmError("wait() before start()")
        if not self._done.wait(timeout):
            self._finish("timeout", EXIT_CODE_CRASH, f"wait() timed out after {timeout:g} s")
        self._teardown()
        return self._exit

    def run(self, timeout: float | None = None) -> VmExit:
        self.start()
        return self.wait(timeout)

    def freeze(self, timeout: float = 30.0):
        """Parks every vCPU; returns a FreezeSnapshot (a context manager that thaws)."""
        if not self.running or self.coordinator is None:
            raise VmmError("freeze() needs a running machine"
                           + (f"; it ended: {self._exit}" if self._exit else ""))
        return self.coordinator.freeze(timeout)

    def thaw(self) -> None:
        self.coordinator.thaw()

    def _start(self) -> None:
        self.pump = ConsolePump(self.vm, self._console_sink)
        self.pump.start()
        self.coordinator = FreezeCoordinator(self.vm, self.vcpus)
        self.threads = [VcpuThread(self.vm, v, self) for v in self.vcpus]
        self.started_at = time.monotonic()
        for t in self.threads:
            t.start()
        for t in self.threads:
            t.wait_started(5.0)
        if self.timeout is not None:
            self._timer = threading.Timer(self.timeout, self._finish, args=(
                "timeout", EXIT_CODE_CRASH, f"the VM ran longer than its timeout of {self.timeout:g} s"))
            self._timer.daemon = True
            self._timer.start()

    def _request_stop(self) -> None:
        if self.vm is not None and self.vm.native is not None:
            request_stop(self.vm)
