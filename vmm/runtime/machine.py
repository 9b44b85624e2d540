"""Machine: the one way to build, run, freeze and stop a VM.

The assembly (options, build steps, devices, exit dispatch, why the VM ended, freeing
KVM resources) is vmm.machine.builder.MachineBuilder; this floor adds what runs: the
vCPU threads, the console pump, the freeze coordinator and the timeout timer, waiting
on the console, and stopping all of them before the assembly is freed. `start` is the
last build step (see BUILD_STEPS); its body is `_start`.
"""

from __future__ import annotations

import re
import threading
import time

from vmm.arch.x86.regs import CR0_PG
from vmm.errors import GuestBootError, VmmError
from vmm.kvm.kvm import MP_STATE_NAMES
from vmm.machine.builder import CONSOLE_TAIL_BYTES, MachineBuilder
from vmm.machine.vmexit import EXIT_CODE_CRASH, ExitReason, VmExit
from vmm.runtime.console import ConsolePump
from vmm.runtime.freeze import FreezeCoordinator
from vmm.runtime.hostsyms import leaked_host_state
from vmm.runtime.vcpu_thread import VcpuThread, request_stop
from vmm.runtime.requests import HandlerEntry, Request, RequestChannel, RequestContext

# wait_for_console looks where the vCPUs are after this long without console output, and
# gives up at once when one holds the host's state instead of the guest's (a fault of the
# host's virtualization: the guest cannot go on, so the rest of the timeout is waste).
STALL_CHECK_S = 15.0


class Machine(MachineBuilder):
    """A KVM virtual machine running one kernel; see docs/CONTRACTS.md."""

    def __init__(self, *args, **kwargs):
        self.threads: list[VcpuThread] = []
        self.pump: ConsolePump | None = None
        self.coordinator: FreezeCoordinator | None = None
        self._timer: threading.Timer | None = None
        # Requests from the guest on COM2 (vmm/runtime/requests.py; docs/requests.md).
        self.requests = RequestChannel(self._serve_request, self._send_reply)
        super().__init__(*args, **kwargs)

    @property
    def running(self) -> bool:
        """True between start() and the VM's end."""
        return self.started_at is not None and not self._done.is_set()

    def __enter__(self) -> "Machine":
        if self.started_at is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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
            self._finish(ExitReason.TIMEOUT, EXIT_CODE_CRASH, f"wait() timed out after {timeout:g} s")
        self._teardown()
        return self._exit

    def run(self, timeout: float | None = None) -> VmExit:
        """start() then wait(): run the VM to its end and return why it ended."""
        self.start()
        return self.wait(timeout)

    def wait_for_console(self, pattern: str | re.Pattern, timeout: float | None = None,
                         start: int = 0) -> re.Match:
        """The first match of `pattern` in the console from absolute byte offset `start`
        (0: the guest's first byte; `console_position()` now: only what comes next; the
        same as an offset into console_text() while nothing was dropped from the window).
        Each wakeup searches only what arrived since the last (and a small overlap, so a
        match spanning appends is found: vmm.machine.console_log.ConsoleScan); the match
        is made on that piece (`match.string`). Two waits for the same pattern from the
        same `start` find the same match. GuestBootError with the console tail when the
        VM ends or `timeout` passes first."""
        log = self.console_log
        scan = log.scan(pattern, start)
        regex = scan.regex
        deadline = None if timeout is None else time.monotonic() + timeout
        flushed = False
        where: list[str] | None = None  # where the vCPUs are, when a look ended the wait
        seen, quiet_since = -1, time.monotonic()
        while True:
            with log.changed:
                match = scan.search_locked()
                if match:
                    return match
                if flushed:
                    why = f"the VM ended ({self._exit})" if self._exit else "the VM is not running"
                    break
                now = time.monotonic()
                left = None if deadline is None else deadline - now
                if left is not None and left <= 0:
                    why = f"{timeout:g} s passed"
                    break
                if log.total != seen:
                    seen, quiet_since = log.total, now
                quiet = not self._done.is_set() and now - quiet_since >= STALL_CHECK_S
                if not self._done.is_set() and not quiet:
                    log.changed.wait(0.25 if left is None else min(left, 0.25))
                    continue
            if quiet:  # silent for a while: a vCPU holding the host's state will never speak
                quiet_since = time.monotonic()
                lines, leaked = self._vcpu_report(freeze_timeout=2.0)
                if not leaked:
                    continue
                where = lines
                why = (f"a vCPU holds the host's state, not the guest's (seen after "
                       f"{STALL_CHECK_S:g} s of silence; not waiting out the timeout)")
                break
            # The VM ended: stop the pump after its final drain, then look once more.
            self._teardown()
            flushed = True
        tail = "\n".join(log.tail(CONSOLE_TAIL_BYTES).splitlines()[-30:])
        if not flushed and where is None:  # still running: say where each vCPU is, so a
            where = self._vcpu_report(freeze_timeout=5.0)[0]  # hang can be told apart
        if not flushed and self.serial is not None:  # a silent console: what the guest's
            where = where + ["  " + self.serial.describe()]  # driver sees of COM1
        where_text = "" if flushed else "\nWhere the vCPUs are:\n" + "\n".join(where)
        raise GuestBootError(f"console never matched {regex.pattern!r}: {why}.{where_text}\n"
                             f"Console tail:\n{tail}")

    def console_position(self) -> int:
        """Bytes the guest has written to its console so far: the absolute offset of the
        next one (wait_for_console's `start` for "from now on")."""
        return self.console_log.total

    def describe_vcpus(self, freeze_timeout: float = 5.0) -> str:
        """One line per vCPU: RIP (with the kernel symbol when known), RSP, IF, CR3 and the
        KVM run state, taken under a short freeze; or, when a vCPU does not park, what its
        thread is doing. For telling a guest that loops from one that waits from a vmm
        thread that is stuck, and both from a host that put its own state into a vCPU (a
        RIP in the host's KVM, vmm.runtime.hostsyms)."""
        return "\n".join(self._vcpu_report(freeze_timeout)[0])

    def _vcpu_report(self, freeze_timeout: float) -> tuple[list[str], bool]:
        """describe_vcpus' lines, and whether some vCPU holds the host's state (its RIP in
        the host's KVM, or paging on with a CR3 outside the guest's RAM)."""
        if not self.running or self.coordinator is None:
            return ["  (the VM is not running)"], False
        lines, leaked_any = [], False
        try:
            with self.freeze(timeout=freeze_timeout) as snap:
                for v, s in zip(self.vcpus, snap.vcpus):
                    if s is None:
                        lines.append(f"  vCPU {v.index}: no snapshot")
                        continue
                    rip = s.regs.rip
                    name = self._symbolize(rip)
                    try:
                        state = MP_STATE_NAMES.get(v.get_mp_state(), "unknown run state")
                    except VmmError:
                        state = "run state unavailable"
                    lines.append(
                        f"  vCPU {v.index}: {state}, RIP {rip:#x}"
                        + (f" ({name})" if name else "")
                        + f", RSP {s.regs.rsp:#x}, IF {(s.regs.rflags >> 9) & 1}, "
                        f"CR3 {s.sregs.cr3:#x}")
                    leaked = leaked_host_state(rip)
                    if leaked:
                        lines.append(f"    {leaked}")
                        leaked_any = True
                    cr3 = s.sregs.cr3 & ~0xFFF & ((1 << 52) - 1)
                    if s.sregs.cr0 & CR0_PG and not self.memory.contains(cr3, 0x1000):
                        lines.append(f"    CR3 {cr3:#x} is outside the guest's RAM: no page "
                                     "table of the guest's own (host state, or a guest that "
                                     "lost its way)")
                        leaked_any = True
        except VmmError as e:  # FreezeTimeout names the threads that did not park
            lines.append(f"  {e}")
        return lines, leaked_any

    def describe_state(self) -> str:
        """Kernel, vCPUs, threads, unclaimed ports and notes in a few lines (for failure
        reports)."""
        lines = [f"kernel {self.kernel}, {self.cpus} vCPU(s), {self.memory_size >> 20} MiB, "
                 f"cmdline {self.cmdline!r}"]
        lines.append(f"running: {self.running}; exit: {self._exit}")
        for t in self.threads:
            lines.append(f"  {t.name}: alive={t.is_alive()} stop={t.stop_reason} "
                         f"python_exits={t.python_exits} {t.stop_detail}")
        if self.serial is not None:
            lines.append(self.serial.describe())
        if self.unhandled_io:
            lines.append("unhandled ports: "
                         + ", ".join(f"{p:#x}x{n}" for p, n in sorted(self.unhandled_io.items())))
        lines.extend(self.notes)
        return "\n".join(lines)

    def freeze(self, timeout: float = 30.0):
        """Parks every vCPU; returns a FreezeSnapshot (a context manager that thaws)."""
        if not self.running or self.coordinator is None:
            raise VmmError("freeze() needs a running machine"
                           + (f"; it ended: {self._exit}" if self._exit else ""))
        return self.coordinator.freeze(timeout)

    def thaw(self) -> None:
        """Release the vCPUs a freeze() parked."""
        self.coordinator.thaw()

    # --- snapshots (vmm/runtime/snapshot.py) ---------------------------------------------
    def snapshot(self, path=None, thaw: bool = True):
        """Freeze, capture everything needed to go on exactly from here (vCPUs, irqchip,
        PIT, clock, devices, guest RAM), thaw (or stay frozen: thaw=False). Returns a
        vmm.runtime.snapshot.Snapshot, also written to directory `path` when given."""
        from vmm.runtime.snapshot import take

        return take(self, path, thaw)

    @classmethod
    def from_snapshot(cls, snapshot_or_path, start: bool = True, **options):
        """A new machine going on from a Snapshot or a snapshot directory: its RAM maps
        the snapshot's copy-on-write; running at once unless start=False. SnapshotError
        before any VM is made when the snapshot is corrupt, of another format, or needs
        what this host lacks."""
        from vmm.runtime.snapshot import restore

        return restore(cls, snapshot_or_path, start, **options)

    @classmethod
    def clone_pool(cls, snapshot, ready: int = 1, **options):
        """A vmm.runtime.clone_pool.ClonePool: clones of `snapshot` whose VM and vCPUs
        were made ahead, on a thread, while the previous clone ran (`pool.clone()`;
        `close()` it, or use it as a context manager)."""
        from vmm.runtime.clone_pool import ClonePool

        return ClonePool(cls, snapshot, ready, **options)

    # --- requests from the guest (COM2; vmm/runtime/requests.py) ------------------------
    def on_request(self, name: str, handler, freeze: bool = True) -> None:
        """Serve the guest's requests named ``name`` (``vmm-request NAME ...`` in the guest)
        with ``handler(context, request)``, on one worker thread, never a vCPU thread. With
        ``freeze`` (default) every vCPU is parked around the call (one rendezvous) and
        ``context`` carries the snapshot; the handler's return value is the reply text, an
        exception an error reply. ``handler=None`` removes it. Before or after start()."""
        self.requests.on_request(name, handler, freeze)

    def _request_context(self, snapshot) -> RequestContext:
        """What a handler gets (vmm.Machine's adds the kernel and Op batches)."""
        return RequestContext(self, snapshot)

    def _serve_request(self, entry: HandlerEntry, request: Request):
        if not entry.freeze:
            return entry.handler(self._request_context(None), request)
        with self.freeze() as snapshot:
            return entry.handler(self._request_context(snapshot), request)

    def _request_bytes(self, data: bytes) -> None:
        self.requests.receive(data)  # on the vCPU thread: lines are queued, nothing waits

    def _send_reply(self, reply: bytes) -> None:
        if self._torn_down or self.request_serial is None or self._done.is_set():
            raise VmmError("the VM ended before the reply")
        self.request_serial.feed(reply)

    # Debug exits and the debugger's share of internal errors go to self.exits.debugger.
    def on_debug(self, vcpu, info) -> bool:
        return self.exits.on_debug(vcpu, info)

    def on_internal_error(self, vcpu) -> bool:
        if self.exits.debugger_internal_error(vcpu):
            return True
        return super().on_internal_error(vcpu)

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
                ExitReason.TIMEOUT, EXIT_CODE_CRASH, f"the VM ran longer than its timeout of {self.timeout:g} s"))
            self._timer.daemon = True
            self._timer.start()

    def _request_stop(self) -> None:
        if self.vm is not None and self.vm.native is not None:
            request_stop(self.vm)

    def _serial_out(self, data: bytes) -> None:
        # Through the C ring, so slow-path bytes keep their order with fast-path ones.
        if self.pump is not None:
            self.pump.push(data)
        else:
            self._console_sink(data)

    def _stop_running(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._request_stop()
        self.requests.close()
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join(10.0)
        if self.pump is not None:
            self.pump.stop()
        self.console_log.close()  # after the pump's final drain: the log file is complete

    def _memory_unused(self) -> bool:
        return not any(t.is_alive() for t in self.threads)
