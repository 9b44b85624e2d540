"""The CLI's run and inject job: boot, optionally inject the scx clock, and report.

``run_session`` drives a vmm.Machine for ``vmm run`` / ``vmm inject``; ``SessionReport``
is what it did, for printing or --json, with the exit status the CLI returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import GuestBootError, KernelFeatureMissing, VmmError
from .machine.guestjob import GuestInitError
from .machine.vmexit import EXIT_CODE_CRASH, ExitReason
from .ops.scx import ScxInjection
from .session import INIT_MARKER, Machine


@dataclass
class SessionReport:
    """What the CLI's run/inject did, for printing or --json."""

    kernel: str
    cmdline: str
    exit: Any = None
    boot_seconds: Optional[float] = None
    injection: Optional[ScxInjection] = None
    extra: dict = field(default_factory=dict)
    error: Optional[str] = None
    job_status: Optional[int] = None  # the guest job's (--exec) status line, when it ran

    @property
    def exit_status(self) -> int:
        """The CLI's exit code: the job's status, 1 for a failed injection, the guest's exit
        code, 0 reset/stopped, else 255."""
        if self.error:
            return EXIT_CODE_CRASH
        if self.job_status is not None:
            return self.job_status
        if self.injection is not None and not self.injection.ok:
            return 1
        if self.exit is None:
            return 0
        if self.exit.reason == ExitReason.EXIT_CODE:
            return self.exit.exit_code
        return 0 if self.exit.reason in (ExitReason.RESET, ExitReason.STOPPED) else EXIT_CODE_CRASH

    def describe(self) -> str:
        """What happened, as the CLI prints it."""
        out = [f"vmm: kernel {self.kernel}", f"vmm: cmdline {self.cmdline}"]
        if self.boot_seconds is not None:
            out.append(f"vmm: reached the boot marker in {self.boot_seconds:.2f} s")
        if self.injection is not None:
            out.append(self.injection.describe())
        for k, v in self.extra.items():
            if not isinstance(v, list):  # lists (the sched_ext states) are for --json
                out.append(f"vmm: {k}: {v}")
        if self.error:
            out.append(f"vmm: error: {self.error}")
        if self.exit is not None:
            out.append(f"vmm: {self.exit}")
        return "\n".join(out)

    def as_dict(self) -> dict:
        """What happened, as plain data (for --json)."""
        return {"kernel": self.kernel, "cmdline": self.cmdline, "boot_seconds": self.boot_seconds,
                "injection": self.injection.as_dict() if self.injection else None,
                "exit": None if self.exit is None else {
                    "reason": self.exit.reason, "exit_code": self.exit.exit_code,
                    "detail": self.exit.detail},
                "exit_status": self.exit_status, "extra": self.extra, "error": self.error}


def run_session(kernel: str, cpus: int = 1, memory: Any = "512M", cmdline: Optional[str] = None,
                initrd: Optional[str] = None, timeout: Optional[float] = None,
                inject_scx: bool = False, wait_for: Optional[str] = None,
                stream: Any = None, vmlinux: Optional[str] = None,
                system_map: Optional[str] = None, check_config: bool = True,
                boot_via_decompressor: Optional[bool] = None,
                exec: Optional[str] = None, include: Any = None,
                serve_scx_clock: bool = False, monitor: Optional[float] = None,
                monitor_json: Optional[str] = None, scx_state: bool = False,
                monitor_plot: Optional[str] = None, from_snapshot: Optional[str] = None,
                snapshot_to: Optional[str] = None, **console: Any) -> SessionReport:
    """Boot; with ``inject_scx``, wait for the boot marker, inject, read back, stop.
    With ``exec``, the guest job's status (``vmm-job: exit N``) is the exit status.
    ``serve_scx_clock``: the guest may ask for the scx batch (Machine.serve_scx_clock).
    ``monitor`` (seconds), ``scx_state``: from the boot marker (or the job's start) to the
    VM's end, sample every CPU's run queue (m.monitor; its JSON to ``monitor_json``) and
    follow sched_ext's state (m.scx.state()); the report says what they saw.
    ``monitor_plot``: draw the monitor's series there (.png/.svg/.html, vmm.report.plot)
    with the scheduler's exits marked.
    ``console``: ``console_log`` (a file for the whole console), ``console_window``.
    ``from_snapshot``: a snapshot directory to go on from instead of booting (the
    kernel, CPUs, memory and command line are the snapshot's). ``snapshot_to``: once the
    console matches ``wait_for`` (default: the boot marker), write a snapshot directory
    there (m.snapshot) and stop."""
    if from_snapshot is not None:
        m = Machine.from_snapshot(from_snapshot, start=False, console=stream, timeout=timeout,
                                  **console)
        kernel = f"{m.kernel} (from the snapshot {from_snapshot})"
    else:
        m = Machine(kernel, cpus=cpus, memory=memory, cmdline=cmdline, initrd=initrd,
                    console=stream, timeout=timeout, vmlinux=vmlinux, system_map=system_map,
                    requires=("sched_ext", "btf") if inject_scx else (),
                    check_config=check_config, boot_via_decompressor=boot_via_decompressor,
                    exec=exec, include=include, **console)
    report = SessionReport(kernel=str(kernel), cmdline="")
    if serve_scx_clock:
        m.serve_scx_clock()
    m.start()  # a bad image or option raises here: a usage-level error, not a guest crash
    try:
        report.cmdline = m.cmdline
        if snapshot_to is not None:
            _snapshot_at(m, report, wait_for, timeout, snapshot_to)
            return report
        if not inject_scx:
            if m.job is not None:
                m.watch_job()  # GuestInitError at once when the job cannot start (exit 1)
            watchers = _start_watchers(m, report, monitor, scx_state, wait_for, timeout)
            report.exit = m.wait()
            _report_watchers(watchers, report, monitor_json, monitor_plot)
            if m.job is not None:
                report.job_status = m.job_status
            return report
        marker = wait_for or (INIT_MARKER if m.is_linux else r"cpus up")
        t0 = time.monotonic()
        try:
            m.wait_for_console(marker, timeout=timeout)
        except VmmError as exc:
            raise GuestBootError(f"the guest did not print {marker!r}: {exc}\n"
                                 f"last console lines:\n{m.console_tail(20)}") from exc
        report.boot_seconds = time.monotonic() - (m.started_at or t0)
        report.extra["kernel files"] = m.introspection_sources()
        report.injection = m.inject_scx_clock()
        try:  # where KASLR put the kernel (vmm.kernel.live.LiveKernel.describe_layout)
            report.extra["kernel layout"] = m.live().describe_layout()
        except VmmError as exc:
            report.extra["kernel layout"] = f"not found: {exc}"
        jiffies0 = _try_read(m, "jiffies")
        time.sleep(0.5)
        jiffies1 = _try_read(m, "jiffies")
        if jiffies0 is not None and jiffies1 is not None:
            report.extra["jiffies after thaw"] = f"{jiffies0} -> {jiffies1} (guest runs on)"
        report.exit = m.stop()
    except GuestInitError:
        raise  # the kernel cannot run the job: an error naming the option, as the config check's
    except (KernelFeatureMissing, GuestBootError, VmmError) as exc:
        report.error = str(exc)
        report.exit = m.stop()
    finally:
        m.stop()
    return report


def _snapshot_at(m: Machine, report: SessionReport, wait_for: Optional[str],
                 timeout: Optional[float], path: str) -> None:
    """Wait for the marker, write the snapshot directory, stop (`vmm snapshot`)."""
    marker = wait_for or (INIT_MARKER if m.is_linux else r"cpus up")
    try:
        m.wait_for_console(marker, timeout=timeout)
    except VmmError as exc:
        raise GuestBootError(f"the guest did not print {marker!r}, so no snapshot was taken: "
                             f"{exc}\nlast console lines:\n{m.console_tail(20)}") from exc
    t0 = time.monotonic()
    m.snapshot(path)
    report.extra["snapshot"] = (f"{path} (at {marker!r}; taken in {time.monotonic() - t0:.2f} s; "
                                f"go on from it: vmm run --from-snapshot {path})")
    report.exit = m.stop()


def _start_watchers(m: Machine, report: SessionReport, monitor: Optional[float],
                    scx_state: bool, wait_for: Optional[str], timeout: Optional[float]):
    """The run's monitor and sched_ext poller, started once the guest is up (the job has
    started, or the boot marker showed); (monitor, poller), either None when not asked
    for or not possible (the reason is in the report)."""
    if not monitor and not scx_state:
        return None, None
    if m.job is None:
        marker = wait_for or (INIT_MARKER if m.is_linux else r"cpus up")
        try:
            m.wait_for_console(marker, timeout=timeout)
        except VmmError as exc:
            report.extra["monitor"] = f"not started: the guest did not print {marker!r} ({exc})"
            return None, None
    mon = poller = None
    if monitor:
        try:
            mon = m.monitor(monitor)
        except VmmError as exc:
            report.extra["monitor"] = f"not started: {exc}"
    if scx_state:
        from .runtime.poll import Poller

        poller = Poller(m.scx.state, interval=monitor or 0.1,
                        key=lambda s: (s.state, s.ops, s.exit_kind, s.exit_reason, s.exit_msg))
        poller.start()
    return mon, poller


def _report_watchers(watchers, report: SessionReport, monitor_json: Optional[str],
                     monitor_plot: Optional[str] = None) -> None:
    """What the run's monitor and sched_ext poller saw, into the report (and the monitor's
    samples as JSON into ``monitor_json``, owner-only: values read from guest memory)."""
    mon, poller = watchers
    if poller is not None:
        poller.stop()
        if poller.changes:
            report.extra["sched_ext"] = " -> ".join(
                f"[{t:.1f} s] {state.describe()}" for t, state in poller.changes)
            report.extra["sched_ext states"] = [dict(state.as_dict(), t=round(t, 3))
                                                for t, state in poller.changes]
        elif poller.error is not None:
            report.extra["sched_ext"] = f"not read: {poller.error}"
    if mon is not None:
        mon.stop()
        stalls = mon.stalls()
        report.extra["monitor"] = (
            f"{len(mon.samples)} samples every {mon.interval:g} s of CPUs "
            f"{','.join(map(str, mon.cpus))} ({', '.join(mon.fixed_fields)}"
            + (f", {len(mon.guarded_fields)} sched_ext event counters" if mon.guarded_fields
               else "") + "); stalls: "
            + ("; ".join(st.describe() for st in stalls) if stalls else "none"))
        if monitor_json:
            from .hostio import atomic_write

            atomic_write(monitor_json, mon.to_json(indent=1) + "\n", private=True)
            report.extra["monitor json"] = monitor_json
        if monitor_plot:
            from .report.plot import render

            states = report.extra.get("sched_ext states", [])  # poller seconds ~ monitor seconds
            try:
                render(mon, monitor_plot, scx_states=states)
                report.extra["monitor plot"] = monitor_plot
            except VmmError as exc:  # no matplotlib, no samples: the run's verdict stands
                report.extra["monitor plot"] = f"not drawn: {exc}"


def _try_read(m: Machine, name: str) -> Optional[int]:
    try:
        return m.read(name, hot=True)
    except VmmError:
        return None
