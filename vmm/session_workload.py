"""``run_workload``: boot a kernel whose guest job runs one real workload (stress-ng,
hackbench) for a duration, optionally in a child cgroup and under a sched_ext scheduler
of the kernel's tree, and return the workload's own output and exit status.

    from vmm.session_workload import run_workload
    r = run_workload("stress-ng", ["--cpu", "2"], 5, scheduler="simple", cgroup="work")
    assert r.ok and r.cgroup == "0::/work" and r.scx_before == "enabled"

The job is vmm.machine.workload's; the packaged tools come from the host (Debian's
stress-ng and rt-tests, `make deps`), their libraries with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .machine.workload import WorkloadResult, workload_job, workload_result

BOOT_ALLOWANCE = 300  # seconds for the boot (and a scheduler's attach) beyond the duration


def run_workload(name: str, args: Sequence[str] = (), duration: float = 10, *,
                 kernel: str = "build:7.3+scx", cpus: int = 2, memory: str = "512M",
                 cgroup: Optional[str] = None, cpuset: Optional[str] = None,
                 scheduler: Optional[str] = None,
                 timeout: Optional[float] = None) -> WorkloadResult:
    """Run workload ``name`` (vmm.machine.workload.WORKLOADS) with ``args`` for
    ``duration`` seconds in a fresh guest; ``scheduler``: a scheduler of the kernel's
    tree ("simple": built and cached by vmm.scxbuild) or a path to one."""
    from .session import Machine

    sched_path = None
    if scheduler is not None:
        if Path(scheduler).is_file():
            sched_path = Path(scheduler)
        else:
            from .errors import KernelFeatureMissing
            from .scxbuild import build_scheduler, describe_gaps

            built = build_scheduler(scheduler, kernel, progress=None)
            if built.lacks:  # refused before the boot, not found out from the console
                raise KernelFeatureMissing(describe_gaps(scheduler, kernel, built.lacks))
            sched_path = built.binary
    command, includes = workload_job(name, args, duration, cgroup=cgroup, cpuset=cpuset,
                                     scheduler=sched_path)
    m = Machine(kernel=kernel, cpus=cpus, memory=memory, console=None, exec=command,
                include=includes)
    m.start()
    try:
        status = m.wait_job(timeout=timeout if timeout is not None else duration + BOOT_ALLOWANCE)
    finally:
        text = m.console_text()
        m.stop()
    result = workload_result(text)
    result.job_status = status
    return result
