"""What the session's Machine tells of the scheduler under test, read from guest memory:
``m.scx`` (sched_ext's state, vmm/kernel/scx_state.py), ``m.bpf`` (BPF maps,
vmm/kernel/bpf_maps.py), ``m.monitor()`` (run-queue samples, vmm/kernel/rq_sample.py
over vmm/runtime/monitor.py), ``m.watch()`` (hardware watchpoints, vmm/runtime/watch.py)
and ``m.watch_for_stall()`` (vmm/runtime/stall_watch.py, vmm/kernel/stall_dump.py).

``Verdicts`` is a mixin of vmm.session.Machine: it uses the Machine's freeze, live,
apply, kernel_image, kernel_config, _target, threads and running, and imports nothing of
the session (the session imports it).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Iterable, Optional, Union

from . import ops
from .errors import VmmError

if TYPE_CHECKING:  # the public signatures' types; nothing here runs
    from .kernel.bpf_maps import BpfView
    from .kernel.live import LiveKernel
    from .kernel.scx_view import ScxView
    from .ops import KernelTarget
    from .runtime.monitor import Monitor
    from .runtime.watch import Watch

Target = Union[str, "KernelTarget"]  # a symbol name, or any KernelTarget (vmm.T)

# Why a data watchpoint may never hit on this host (m.watch).
PVM_DATA_WATCH_NOTE = ("on a PVM host guest ring 0 is emulated and KVM's emulator checks "
                       "execute breakpoints only: this data watchpoint is armed but will not "
                       "hit in kernel code (VMX/SVM hosts hit it; access='x' works here)")


class Verdicts:
    """m.scx, m.bpf, m.monitor, m.watch and m.watch_for_stall (the module doc)."""

    # --- sched_ext verdicts from the host (vmm/kernel/scx_state.py, rq_sample.py;
    #     vmm/runtime/monitor.py) ------------------------------------------------------
    def _sampling_live(self) -> "LiveKernel":
        """A live view for reads that do not freeze: made once, in one short freeze (the
        slide, phys_base and bases it finds do not change while the kernel runs)."""
        live = self.__dict__.get("_sampling_live_view")
        if live is None:
            with self.freeze() as snap:
                live = self.live(snap)
            self.__dict__["_sampling_live_view"] = live
        return live

    def _config_hz(self) -> Optional[int]:
        config = self.kernel_config()
        value = config.values.get("CONFIG_HZ") if config is not None else None
        return int(value) if value and value.isdigit() else None

    def _write_kva_u64(self, kva: int, value: int) -> None:
        self.apply(ops.Op.WriteKernelCold([(ops.KernelTarget.kva(kva, 8), ops.KernelValue.u64(value))]))

    @property
    def scx(self) -> "ScxView":
        """sched_ext's state from the host (vmm.kernel.scx_view.ScxView): ``m.scx.state()``
        -> ScxState(state, ops, exit_kind, exit_reason, exit_msg, ...),
        ``m.scx.wait_for_exit(timeout)``, ``m.scx.watchdog_timeout`` (seconds; settable)."""
        view = self.__dict__.get("_scx_view")
        if view is None:
            from .kernel.scx_view import ScxView

            from .kvm.pvm import is_pvm_host

            coordinator = lambda: self.coordinator  # noqa: E731 (set at the start)
            # PVM's emulated ring 0 never hits a data watchpoint: exits are polled there
            watch_root = None if is_pvm_host() else (
                lambda on_hit: self.watch("scx_root", on_hit, access="w"))
            view = ScxView(self.kernel_image, live=self._sampling_live, freeze=self.freeze,
                           frozen=lambda: bool(coordinator() is not None and coordinator().frozen),
                           write_u64=self._write_kva_u64, hz=self._config_hz,
                           running=lambda: self.running, watch_root=watch_root)
            self.__dict__["_scx_view"] = view
        return view

    @staticmethod
    def _bpf_batch(entries) -> list:
        """vmm.kernel.bpf_maps' planned stores (WriteEntry: kva, width, int or bytes) as
        one cold batch's entries: raw kva targets of the field's width, U32/U64 for
        4/8-byte ints, Bytes otherwise (the ops path checks the widths again)."""
        batch = []
        for e in entries:
            if isinstance(e.value, int):
                value = ops.KernelValue.u32(e.value) if e.width == 4 else ops.KernelValue.u64(e.value)
            else:
                value = ops.KernelValue.bytes(e.value)
            batch.append((ops.KernelTarget.kva(e.kva, e.width), value))
        return batch

    @property
    def bpf(self) -> "BpfView":
        """The guest kernel's BPF maps from the host (vmm.kernel.bpf_maps.BpfView):
        ``m.bpf.maps()`` -> [BpfMap(id, name, type, key_size, value_size, max_entries)],
        ``m.bpf.map(name).read(key=0)`` (decoded with the map's BTF),
        ``.write(key, {field: value})`` (one checked cold batch)."""
        view = self.__dict__.get("_bpf_view")
        if view is None:
            from .kernel.bpf_maps import BpfView

            coordinator = lambda: self.coordinator  # noqa: E731 (set at the start)
            view = BpfView(self.kernel_image, live=self._sampling_live, freeze=self.freeze,
                           frozen=lambda: bool(coordinator() is not None and coordinator().frozen),
                           write=lambda entries: self.apply(ops.Op.WriteKernelCold(
                               self._bpf_batch(entries))))
            self.__dict__["_bpf_view"] = view
        return view

    def monitor(self, interval: float = 0.1, fields: Optional[Iterable[str]] = None,
                cpus: Optional[Iterable[int]] = None,
                max_samples: Optional[int] = None, events: bool = True) -> "Monitor":
        """Start sampling every CPU's run queue every ``interval`` s without freezing
        (vmm.runtime.monitor.Monitor, already started; ``with`` stops it): fields
        vmm.kernel.rq_sample.RQ_FIELDS (nr_running, scx.nr_running, clock, scx.flags,
        scx.local_dsq.nr) where this kernel has them (the rest in ``.skipped``),
        addresses resolved once now. ``.samples``, ``.column(field, cpu)``,
        ``.stalls(window_s)``, ``.to_json()``, ``.plot(path)`` (vmm.report.plot); the last
        ``max_samples`` are kept (default:
        vmm.runtime.monitor.MAX_ROWS rows' worth). ``events``: sched_ext's per-CPU event
        counters (SCX_EV_*, vmm.kernel.scx_events) as more columns where the kernel has
        them (21 more loads per CPU per sample on Linux 7.3). VmmError at once when the
        VM is not running."""
        if not self.running:
            raise VmmError("the VM is not running: start it before m.monitor()")
        from .kernel.rq_sample import RQ_FIELDS, plan_rq_sampling
        from .kernel.scx_events import plan_scx_event_columns
        from .runtime.monitor import Monitor

        live = self._sampling_live()
        plan = plan_rq_sampling(live, RQ_FIELDS if fields is None else fields, cpus)
        guarded, skipped = (plan_scx_event_columns(live, plan.cpus, plan.skipped) if events
                            else (None, plan.skipped))
        mon = Monitor(self.__dict__.get("_guest_memory"), plan.cpus, plan.fields, plan.raw(),
                      threads=self.threads, interval=interval, running=lambda: self.running,
                      skipped=skipped, max_samples=max_samples, guarded=guarded,
                      tasks_of=self._queued_tasks).start()
        return self._kept_for_report("_monitors", mon)

    def _kept_for_report(self, key: str, obj):
        """Keep ``obj`` (a monitor or stall watch, the last 4 of each) for the evidence a
        failed test shows (vmm.report.evidence, the pytest plugin); a monitor also gets
        ``.plot(path, scx_states=())``: its series drawn to .png/.svg/.html
        (vmm.report.plot.render; matplotlib, ``pip install 'vmm[plot]'``)."""
        from collections import deque
        from functools import partial

        self.__dict__.setdefault(key, deque(maxlen=4)).append(obj)
        if key == "_monitors":
            from .report.plot import render

            obj.plot = partial(render, obj)
        return obj

    def _queued_tasks(self, cpus: list) -> dict:
        """{cpu: QueuedTasks} of ``cpus`` (vmm.kernel.rq_tasks), read in one freeze."""
        from .kernel.rq_tasks import queued_on

        with self.freeze() as snap:
            return queued_on(self.live(snap), cpus)

    def watch(self, target: Target, on_hit=None, access: str = "w", path: Optional[str] = None,
              cpu: Optional[int] = None, type: Optional[str] = None) -> "Watch":
        """A hardware watchpoint (DR0-DR3, KVM_SET_GUEST_DEBUG; vmm/runtime/watch.py) on
        ``target`` (any KernelTarget, or a symbol with path/cpu as in read): ``access``
        "w" (writes) or "rw" (reads and writes), or "x" (execution of that address). A
        hit freezes every vCPU, calls ``on_hit(ctx)`` (a WatchContext: a request
        handler's context plus ``vcpu``, ``rip``, ``old``, ``new``) and thaws. Returns
        the Watch (``.hits``, ``.errors``, ``.remove()``; ``with`` removes it). At most 4
        at once with the gdb stub's; a target not 1/2/4/8 bytes and naturally aligned is
        refused (WatchError) before anything is armed."""
        from .ops.resolve import LiveResolver
        from .runtime.watch import (EFER_LMA, Watch, WatchError, check_watch_range,
                                    debug_registers)
        from .session_requests import WatchContext

        if not self.running:
            raise VmmError("the VM is not running: start it before m.watch()")
        t = self._target(target, path, cpu, type)
        regs = debug_registers(self)
        with self.freeze() as snap:
            loc = t.resolve(LiveResolver(self.live(snap)))
            if loc.bit_size:
                raise WatchError(f"watch {t}: a bitfield; watch its storage unit instead")
            v0 = next((v for v in snap.vcpus if v is not None and not v.error), None)
            long_mode = v0 is None or bool(v0.sregs.efer & EFER_LMA)
            length = check_watch_range(loc.kva, loc.size, access, long_mode, str(t))
            w = Watch(regs, str(t), loc.kva, loc.gpa, length, access, on_hit,
                      lambda s, hit: WatchContext(self, s, hit))
            regs.arm(w)
        self.dirty = True  # guest debugging is on: the pytest plugin does not reuse it
        from .kvm.pvm import is_pvm_host

        if access != "x" and is_pvm_host():
            w.note = PVM_DATA_WATCH_NOTE
            warnings.warn(f"m.watch({t}): {PVM_DATA_WATCH_NOTE}", RuntimeWarning, stacklevel=2)
        return w

    def watch_for_stall(self, window_s: float, on_stall=None, interval: float = 0.1,
                        min_cpu_fraction: float = 0.1, monitor: "Optional[Monitor]" = None):
        """Watch for a stall (vmm/runtime/stall_watch.py, vmm/kernel/stall_dump.py): a monitor (``monitor``, else a new
        one at ``interval``) is asked its stall verdict (window ``window_s``) every
        ``interval``; on a new stall every vCPU is frozen at once and a StallReport
        captured: every CPU's rq (the monitor's fields, curr->pid/comm where the kernel
        has them) and m.scx.state(), all read from guest memory; then ``on_stall(report)``.
        Returns the StallWatch (``.wait(timeout)``, ``.reports``, ``.stop()``; ``with``
        stops it), already running."""
        from .kernel.stall_dump import capture_report, monotonic_since
        from .runtime.stall_watch import StallWatch

        mon = monitor if monitor is not None else self.monitor(interval)
        fields = mon.fixed_fields  # the run queue's own (not the event counters)

        def capture(stalls: list):
            with self.freeze() as snap:
                return capture_report(stalls, self.live(snap), mon.cpus, fields,
                                      monotonic_since(mon.t0), lambda: self.scx.state(),
                                      snap.latency_ns / 1000)

        return self._kept_for_report("_stall_watches", StallWatch(
            mon, capture, window_s, on_stall, interval, min_cpu_fraction,
            own_monitor=monitor is None).start())
