"""The top of the stack: a Machine that knows its kernel, and the CLI's main job.

``vmm.Machine`` = vmm.runtime.Machine (boot, devices, vCPU threads, freeze) plus the
kernel introspection (symbols, BTF) and the ops, so a kernel developer writes::

    with vmm.Machine(kernel="build:7.3", cpus=2) as m:
        m.wait_for_console("Run /init as init process", timeout=900)
        print(m.read("jiffies"), m.read("runqueues", "scx.flags", cpu=1))
        m.inject_scx_clock()          # one cold batch over every possible CPU

Data flows one way: load -> build -> run -> freeze -> resolve -> apply -> thaw.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from .arch.x86.regs import MSR_LSTAR
from .errors import GuestBootError, VmmError
from .kernel.kaslr import slide_from_lstar
from .machine.vmexit import ExitReason
from .runtime.machine import Machine as RunningMachine
from .runtime.vcpu_thread import VcpuThread
from .session_verdicts import Verdicts

# The op machinery and the request context are not imported until they are used: a boot
# (`from vmm import Machine`, then start) needs none of them (vmm/lazy.py).
from . import ops

if TYPE_CHECKING:  # the public signatures' types; nothing here runs
    from pathlib import Path

    import drgn

    from .debug.gdbstub import GdbStub
    from .debug.vmcore import VmcoreReport
    from .kernel import Kernel
    from .kernel.kconfig import KernelConfig
    from .kernel.live import LiveKernel
    from .kernel.locate import KernelFiles
    from .kvm.memory import GuestMemory
    from .ops import Bytes, KernelTarget, KernelValue, Op, OpResult
    from .ops.scx import ScxInjection
    from .runtime.freeze import FreezeSnapshot
    from .session_requests import KernelRequestContext

PathLike = Union[str, "os.PathLike[str]"]
Target = Union[str, "KernelTarget"]  # a symbol name, or any KernelTarget (vmm.T)

# What a real Linux kernel prints when it hands over to user space.
INIT_MARKER = r"Run /init as init process|Run .* as init process"


def _spin_initramfs() -> str:
    from .machine.initramfs import build_initramfs
    return str(build_initramfs(init="spin"))


def _is_spec(kernel: object) -> bool:
    """'debian', 'build', 'build:7.3' name store kernels; anything else is a path."""
    if not isinstance(kernel, str) or os.path.exists(kernel):
        return False
    return kernel.split(":")[0].split("+")[0] in ("debian", "build")


class _TrackedMemory:
    """``Machine.memory`` as users see it once the VM runs: every write through it
    marks the machine dirty (the pytest plugin then does not reuse it). Writes the
    machine makes itself (boot, PVM emulation on vCPU threads) do not."""

    __slots__ = ("_raw", "_machine")

    def __init__(self, raw: "GuestMemory", machine: "Machine"):
        self._raw = raw
        self._machine = machine

    def _mark(self) -> None:
        if not isinstance(threading.current_thread(), VcpuThread):
            self._machine.dirty = True

    def write(self, gpa: int, data: "bytes | bytearray | memoryview") -> None:
        self._mark()
        self._raw.write(gpa, data)

    def write_u8(self, gpa: int, value: int) -> None:
        self._mark()
        self._raw.write_u8(gpa, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self._mark()
        self._raw.write_u16(gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._mark()
        self._raw.write_u32(gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._mark()
        self._raw.write_u64(gpa, value)

    def fetch_or_u32(self, gpa: int, mask: int) -> int:
        self._mark()
        return self._raw.fetch_or_u32(gpa, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __repr__(self) -> str:
        return f"<tracked {self._raw!r}>"


class Machine(Verdicts, RunningMachine):
    """A VM running one kernel, with that kernel's symbols and types at hand.

    ``kernel`` is a vmlinux ELF or bzImage path, a directory holding them, or a store
    spec ("build:7.3", "debian"; see vmm.kernelstore). ``vmlinux`` / ``system_map``
    override where symbols and BTF come from (default: the kernel's own files).
    """

    def __init__(self, kernel: PathLike, *, vmlinux: Optional[PathLike] = None,
                 system_map: Optional[PathLike] = None,
                 initrd: Optional[PathLike] = None, requires: Iterable[str] = (), check_config: bool = True,
                 **options: Any):
        self.artifacts = None
        # What the job needs of the kernel beyond booting (vmm.kernel.kconfig.NEEDS keys:
        # "sched_ext", "btf"); checked against the kernel's config before the start.
        self.requires = set(requires)
        self.check_config = check_config
        self.kernel_files = None
        self._kernel_path = None  # a kernel given as a path whose vmlinux search waits
        self.job = _guest_job(options.pop("exec", None), options.pop("include", None))
        if self.job is not None:
            initrd = initrd or str(self.job)
        boot = kernel
        if _is_spec(kernel):
            from . import kernelstore
            self.artifacts = kernelstore.resolve_kernel(kernel)
            boot = str(self.artifacts.boot_image_for(options.get("boot_via_decompressor")))
            vmlinux = vmlinux or self.artifacts.vmlinux
            system_map = system_map or self.artifacts.system_map
        elif isinstance(kernel, (str, os.PathLike)):
            # A path: an image file or a directory (build tree, loose files); symbols
            # and types come from the files found with it, not the stripped payload.
            # The search for the image's unstripped vmlinux (which may decompress the
            # image to compare build ids: 65-100 ms natively, seconds under emulation)
            # waits for the first use of the symbols (_searched_kernel_files).
            from .kernel.locate import locate
            self.kernel_files = locate(kernel, vmlinux=vmlinux, system_map=system_map, search=False)
            self._kernel_path = kernel
            boot = str(self.kernel_files.boot)
        from .kernel import image_symbols
        options.setdefault("symbol_table", image_symbols)  # names RIPs in crash reports
        # Real Linux with no initrd given gets our spinning init: the one user space a
        # PVM host can run (it cannot make system calls there) and harmless elsewhere.
        if initrd is None:
            options.setdefault("default_initrd", _spin_initramfs)
        # Refuse, before any vCPU runs, a kernel whose config lacks what this run needs.
        options.setdefault("after_build", self._check_built_kernel)
        super().__init__(boot, initrd=initrd, **options)
        self._vmlinux_path = vmlinux
        self._system_map_path = system_map
        self._introspection = None
        self._last_snapshot = None

    # --- guest memory: every write after the start marks the machine dirty ----------
    @property
    def memory(self) -> "Optional[GuestMemory | _TrackedMemory]":
        raw = self.__dict__.get("_guest_memory")
        if raw is None or self.started_at is None:
            return raw
        tracked = self.__dict__.get("_tracked_memory")
        if tracked is None or tracked._raw is not raw:
            tracked = self.__dict__["_tracked_memory"] = _TrackedMemory(raw, self)
        return tracked

    @memory.setter
    def memory(self, value: "Optional[GuestMemory]") -> None:
        """Guest RAM; after the start, a proxy whose writes mark the machine dirty."""
        self.__dict__["_guest_memory"] = value

    def feed_console(self, data: bytes) -> None:
        """Type bytes into COM1 (marks the machine dirty)."""
        self.dirty = True  # input changes what the guest does next
        super().feed_console(data)

    # --- introspection -------------------------------------------------------------
    @property
    def vmlinux(self) -> "Kernel":
        """Deprecated name of `kernel_image` (it is a vmm.kernel.Kernel, not a path)."""
        warnings.warn("Machine.vmlinux is deprecated: use Machine.kernel_image (a vmm.kernel.Kernel)",
                      DeprecationWarning, stacklevel=2)
        return self.kernel_image

    @property
    def kernel_image(self) -> "Kernel":
        """The kernel's symbols and BTF (vmm.kernel.Kernel), loaded on first use."""
        if self._introspection is None:
            from .kernel.shared import load_shared
            art = self.artifacts
            if art is not None and art.name.startswith("debian-") and art.system_map is None:
                # Debian's vmlinuz has BTF but no symbol table: the symbols are in the
                # -dbg package, fetched (once, ~350 MB) only when they are needed.
                from . import kernelstore
                self.artifacts = kernelstore.resolve_kernel("debian+dbg")
                self._vmlinux_path = self.artifacts.vmlinux
                self._system_map_path = self.artifacts.system_map
            if self.kernel_files is not None:
                self._introspection = self._searched_kernel_files().load()
                return self._introspection
            source = self._vmlinux_path or self.kernel
            with open(source, "rb") as f:
                is_elf = f.read(4) == b"\x7fELF"
            # Parsed once per process while the files stay unchanged (vmm.kernel.shared):
            # clones and a test session's machines of one kernel share it.
            if is_elf:
                self._introspection = load_shared(vmlinux=source, system_map=self._system_map_path)
            else:
                self._introspection = load_shared(bzimage=source, system_map=self._system_map_path)
        return self._introspection

    def _require_symbols(self) -> None:
        """A kernel loaded without a symbol table: say so and what to pass, before any
        lookup says "no kernel symbol named ..."."""
        from .kernel.locate import require_symbols
        require_symbols(self.kernel_image, self.kernel_files or self._vmlinux_path or self.kernel)

    def _searched_kernel_files(self) -> "KernelFiles":
        """kernel_files with the vmlinux search done (once; deferred from the start)."""
        if self._kernel_path is not None:
            from .kernel.locate import locate
            self.kernel_files = locate(self._kernel_path, vmlinux=self._vmlinux_path,
                                       system_map=self._system_map_path)
            self._kernel_path = None
        return self.kernel_files

    def introspection_sources(self) -> str:
        """Which files the symbols and the types come from, in words."""
        if self.kernel_files is not None:
            return self._searched_kernel_files().describe()
        k = self.kernel_image
        return ", ".join(k.sources) or "?"

    def _check_built_kernel(self) -> None:
        # Runs as the builder's after_build hook: a refusal frees the half-built machine.
        if self.check_config and self.is_linux:
            self._check_kernel_config()

    def kernel_config(self) -> "Optional[KernelConfig]":
        """The kernel's config (vmm.kernel.kconfig.KernelConfig) or None: the .config
        found with the kernel (beside it, its build tree, /boot, the store), else the
        IKCONFIG blob in the image."""
        from .kernel.kconfig import find_config
        files, art = self.kernel_files, self.artifacts
        path = (files.config if files else None) or (art.config if art else None)
        images = [files.vmlinux if files else None, art.vmlinux if art else None,
                  self.kernel if isinstance(self.kernel, (str, os.PathLike)) else None]
        return find_config(path, images)

    def _check_kernel_config(self) -> None:
        """Refuse, before any vCPU runs, a kernel whose config lacks what this run needs."""
        needs = ["console"]
        if self.initrd is not None:
            needs.append("initramfs")
        if self.cpus > 1:
            needs.append("smp")
        if self.job is not None:
            needs.append("job")  # the job's /init: ELF, proc/sys/devtmpfs, the console
        needs += sorted(self.requires)
        config = self.kernel_config()
        if config is None:
            self.notes.append("kernel config: none found (no .config beside the image, "
                              "no IKCONFIG): not checked")
            return
        config.check(needs)
        self.notes.append(f"kernel config {config.source}: has what this run needs "
                          f"({', '.join(needs)})")

    def live(self, snapshot: "Optional[FreezeSnapshot]" = None) -> "LiveKernel":
        """The kernel applied to this guest's memory; registers from ``snapshot`` (a
        freeze) give CR3 for page walks and LSTAR for the KASLR slide."""
        snap = snapshot or self._last_snapshot
        kwargs: dict = {}
        if snap is not None:
            v0 = next((v for v in snap.vcpus if v is not None and not v.error), None)
            if v0 is not None:
                kwargs = {"cr3": v0.sregs.cr3, "cr4": v0.sregs.cr4,
                          "idt_base": v0.sregs.idt.base}
                lstar = v0.msrs.get(MSR_LSTAR)
                if lstar:
                    kwargs["lstar"] = lstar
        return self.kernel_image.attach(self.__dict__.get("_guest_memory"), **kwargs)

    def _symbolize(self, addr: int) -> Optional[str]:
        """"name+0xoff" for a RIP; under KASLR through the vmlinux's symbols moved by the
        slide LSTAR gives in the last freeze. Only from symbols already at hand: naming a
        RIP in an error report never fetches or loads a -dbg package."""
        name = super()._symbolize(addr)
        if name is not None or (self._introspection is None and self._vmlinux_path is None
                                and self.kernel_files is None):
            return name
        try:
            symbols = self.kernel_image.symbols
            snap = self._last_snapshot
            v0 = next((v for v in snap.vcpus if v is not None), None) if snap else None
            lstar = v0.msrs.get(MSR_LSTAR) if v0 is not None else None
            slide = slide_from_lstar(symbols, lstar) if lstar else 0
            return symbols.format_address(addr - slide)
        except (VmmError, OSError, KeyError, ValueError):
            return None

    def freeze(self, timeout: float = 30.0):
        """Park every vCPU (vmm.runtime.Machine.freeze); the snapshot also gives live() its
        registers."""
        snap = super().freeze(timeout)
        self._last_snapshot = snap
        return snap

    # --- ops -------------------------------------------------------------------------
    def apply(self, op: Op, freeze_timeout: float = 30.0) -> OpResult:
        """Run an Op batch (see vmm.ops): a cold batch is one freeze rendezvous."""
        if op.action == "write":
            self.dirty = True
        from .ops.resolve import LiveResolver

        return ops.apply_op(op, self.__dict__.get("_guest_memory"),
                            lambda snap: LiveResolver(self.live(snap)),
                            lambda: self.freeze(freeze_timeout))

    @staticmethod
    def _target(target: Target, path: Optional[str], cpu: Optional[int],
                type: Optional[str]) -> KernelTarget:
        if isinstance(target, ops.KernelTarget):
            return target
        if cpu is not None:
            return ops.KernelTarget.per_cpu(target, cpu, path, type)
        if path:
            return ops.KernelTarget.field(target, path, type)
        return ops.KernelTarget.symbol(target, type=type)

    def read(self, target: Target, path: Optional[str] = None, cpu: Optional[int] = None,
             hot: bool = False, type: Optional[str] = None) -> Union[int, bytes]:
        """One value, decoded from its BTF type as ``vmm.kernel.live`` does: an int for
        integers, bools, enums and pointers (signed per type; a bitfield as its own bits),
        bytes otherwise. Cold (frozen) by default; ``hot=True`` reads the running guest."""
        t = self._target(target, path, cpu, type)
        hold = nullcontext(None) if hot else self.freeze()
        with hold as snap:
            op = ops.Op.ReadKernelHot([t]) if hot else ops.Op.ReadKernelCold([t])
            value = self.apply(op).values[0]
            raw = value.data if isinstance(value, ops.Bytes) else value.encode()
            decoded = self._decode(t, raw, snap)
        if decoded is not None:
            return decoded
        return value.data if isinstance(value, ops.Bytes) else value.value

    def _decode(self, t: KernelTarget, raw: bytes,
                snap: "Optional[FreezeSnapshot]") -> Optional[Union[int, bytes]]:
        """The live view's decoding of ``raw`` for a symbol target whose BTF field is
        known (same object, same size), else None (raw address targets, sized symbols,
        globals BTF does not describe)."""
        name = getattr(t, "name", None)
        if name is None or getattr(t, "size", None) is not None:
            return None
        live = self.live(snap)
        try:
            _, f = live.resolve(name, getattr(t, "path", None), getattr(t, "cpu", None),
                                getattr(t, "type", None))
        except VmmError:
            return None
        if f is None or f.size != len(raw):
            return None
        return live.decode(raw, f)

    def write(self, target: Target, value: KernelValue, path: Optional[str] = None,
              cpu: Optional[int] = None, hot: bool = False, type: Optional[str] = None) -> OpResult:
        """Write `value` to a symbol or field (one cold batch; hot=True writes the running
        guest)."""
        t = self._target(target, path, cpu, type)
        op = ops.Op.WriteKernelHot([(t, value)]) if hot else ops.Op.WriteKernelCold([(t, value)])
        return self.apply(op)

    def possible_cpus(self) -> list[int]:
        """The guest's possible CPUs (read while frozen)."""
        with self.freeze() as snap:
            return self.live(snap).possible_cpus()

    def sched_domains(self, cpu: int = 0) -> list:
        """CPU `cpu`'s sched domains as the guest kernel built them, lowest first
        (vmm.kernel.sched_domains.SchedDomain: name, cpus, level, flags), read through
        BTF in one freeze; compare with ``self.topology.expected_sched_domains(cpu)``."""
        from .kernel.sched_domains import read_sched_domains

        with self.freeze() as snap:
            return read_sched_domains(self.live(snap), cpu)

    def inject_scx_clock(self, clock: Optional[int] = None,
                         cpus: Optional[Iterable[int]] = None) -> "ScxInjection":
        """The mission in one call: one cold batch that, for every possible CPU, writes
        ``rq->scx.clock`` then ORs ``SCX_RQ_CLK_VALID`` into ``rq->scx.flags``; then a
        cold read-back of both fields on every CPU."""
        from .ops.scx import ScxCpuRow, ScxInjection

        ops.clk_valid_mask(self.kernel_image)  # refuses a kernel without the flag before freezing
        self._require_symbols()
        with self.freeze() as snap:
            live = self.live(snap)
            cpu_list = list(cpus) if cpus is not None else live.possible_cpus()
            if clock is None:
                # The guest's own notion of now where there is one, so time stays monotonic.
                clock = snap.clock if snap.clock else time.monotonic_ns()
            batch = ops.scx_clock_batch(self.kernel_image, cpu_list, clock)
            before = self.apply(ops.Op.ReadKernelCold([t for t, _ in batch]))
            written = self.apply(ops.Op.WriteKernelCold(batch))
            after = self.apply(ops.Op.ReadKernelCold([t for t, _ in batch]))
        mask = batch[1][1].mask
        rows = []
        for i, cpu in enumerate(cpu_list):
            rows.append(ScxCpuRow(
                cpu=cpu,
                clock_before=before.values[2 * i].value, clock_after=after.values[2 * i].value,
                flags_before=before.values[2 * i + 1].value,
                flags_after=after.values[2 * i + 1].value,
                clock_addr=written.entries[2 * i].location.gpa,
                flags_addr=written.entries[2 * i + 1].location.gpa))
        return ScxInjection(clock=clock, mask=mask, rows=rows,
                            freeze_latency_us=snap.latency_ns / 1000,
                            apply_us=written.apply_seconds * 1e6)

    # --- requests from the guest (vmm.runtime.requests; docs/requests.md) ----------------
    def on_request(self, name: str, handler, freeze: bool = True) -> None:
        """Serve the guest's ``vmm-request NAME ARGS...`` with ``handler(ctx, request)``:
        ``ctx`` is a KernelRequestContext (``ctx.apply(batch)``, ``ctx.inject_scx_clock``,
        ``ctx.read``, ``ctx.live``), all inside the one freeze around the call; the return
        value is the reply text, an exception an error reply (vmm.runtime.Machine.on_request).
        Marks the machine dirty: the pytest plugin does not hand it, handler and all, to
        another test."""
        self.dirty = True
        super().on_request(name, handler, freeze)

    def _request_context(self, snapshot) -> "KernelRequestContext":
        from .session_requests import KernelRequestContext

        return KernelRequestContext(self, snapshot)

    def serve_scx_clock(self, name: str = "scx-clock") -> None:
        """Serve the built-in request ``NAME [cpu=N] [clock=N]`` (scx_clock_request): the
        scx clock/flag batch on CPU N (default every possible CPU) when the guest asks,
        e.g. ``vmm-request -c 1 scx-clock``; `vmm run --serve-scx-clock` turns it on."""
        from .session_requests import scx_clock_request

        self.on_request(name, scx_clock_request)

    # --- kernel debuggers (vmm/debug) ---------------------------------------------------
    dump_on_panic: Optional[str] = None  # set to a path: a panic writes a vmcore there
    core_path: Optional[str] = None      # the vmcore written on panic, if any

    def drgn(self, vmlinux: Optional[PathLike] = None) -> "drgn.Program":
        """A drgn.Program over the guest's memory (reads inside ``with m.freeze():``
        are consistent). Needs drgn (`pip install drgn`) and a vmlinux with DWARF."""
        from .debug.machine import drgn_program
        return drgn_program(self, vmlinux)

    def dump_core(self, path: PathLike) -> "VmcoreReport":
        """Write an ELF vmcore (drgn and crash open it) while frozen -> VmcoreReport."""
        from .debug.machine import dump_core
        report = dump_core(self, path)
        # a failed test's evidence names every vmcore written (vmm/report/evidence.py)
        self.__dict__.setdefault("vmcores_written", []).append(str(path))
        del self.__dict__["vmcores_written"][:-16]
        return report

    def gdb_server(self, port: int = 0, host: str = "127.0.0.1") -> "GdbStub":
        """A GDB remote stub on host:port (a thread): `gdb vmlinux -ex 'target remote
        :PORT'`; the guest is frozen while gdb is stopped (vmm/debug/gdbstub.py)."""
        from .debug.gdbstub import GdbStub
        return GdbStub(self, host, port)

    def _finish(self, reason: str, exit_code: int, detail: str) -> None:
        if reason == ExitReason.PANIC and self.dump_on_panic and self.core_path is None and self.exit is None:
            from .debug.machine import dump_on_panic
            detail += dump_on_panic(self, self.dump_on_panic)
        super()._finish(reason, exit_code, detail)


# --- the guest job (--exec / --include; vmm.machine.guestjob) ---------------------------
def _guest_job(command: Optional[str], include: Optional[Iterable[str]]) -> "Optional[Path]":
    """The job's initramfs path, or None without exec/include; refuses on PVM hosts."""
    if command is None and not include:
        return None
    from .machine import guestjob
    guestjob.check_host()
    return guestjob.build_job_initramfs(command or "exec sh", guestjob.includes_list(include))


def _job_status(self: Machine) -> Optional[int]:
    """The guest job's exit status from its last console line; None until it printed it."""
    from .machine.guestjob import job_status
    return job_status(self.console_text())


def _watch_job(self: Machine, timeout: Optional[float] = None) -> None:
    """Wait until the job starts (its init's start line), a console line says it cannot
    start, the VM ends or `timeout` passes; GuestInitError (the VM stopped) for the second
    (vmm.machine.guestjob.init_failure names the cause and the kernel option)."""
    from .machine.guestjob import JOB_END_RE, GuestInitError, init_failure
    t0 = time.monotonic()
    try:
        line = self.wait_for_console(JOB_END_RE, timeout=timeout).group(0)
        if line.startswith("vmm-job: ") and not line.startswith("vmm-job: error"):
            return  # the job runs (or ran): from here its end is the VM's
    except GuestBootError:
        if self.exit is None and (timeout is None or time.monotonic() - t0 < timeout):
            raise  # neither the end nor the timeout: a stuck vCPU, said by wait_for_console
    failure = init_failure(self.console_text())
    if failure is not None:
        self.stop()
        raise GuestInitError(failure)


def _wait_job(self: Machine, timeout: Optional[float] = None) -> int:
    """Wait for the VM to end (the job's init reboots after the job) and return the job's
    status; GuestInitError at once when the job cannot start (_watch_job), GuestBootError
    when the VM ended without the status line."""
    t0 = time.monotonic()
    _watch_job(self, timeout)
    vm_exit = self.wait(timeout=None if timeout is None else max(0.0, timeout - (time.monotonic() - t0)))
    status = self.job_status
    if status is None:
        raise GuestBootError(f"the guest job printed no 'vmm-job: exit N' line ({vm_exit}); "
                             f"last console lines:\n{self.console_tail(20)}")
    return status


Machine.job_status = property(_job_status)  # type: ignore[attr-defined]
Machine.wait_job = _wait_job  # type: ignore[attr-defined]
Machine.watch_job = _watch_job  # type: ignore[attr-defined]
