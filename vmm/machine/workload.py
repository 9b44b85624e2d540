"""Real workloads in the guest job: a named, packaged tool run for a duration, optionally
in a child cgroup and under a sched_ext scheduler, with its own output and exit status.

``workload_job("stress-ng", ["--cpu", "2"], 10)`` gives the job's shell command and the
``--include`` list (the host's installed binary: Debian's stress-ng, rt-tests' hackbench;
their shared libraries come along, vmm.machine.guestjob); the job prints its lines
between two markers that ``workload_result`` reads back from the console::

    vmm-workload: begin name=stress-ng cgroup=0::/vmm-work scx=enabled
    <the workload's own stdout and stderr>
    vmm-workload: end status=0 seconds=10.03 scx=enabled

The session boots it (vmm.session_workload.run_workload).  The guest's init mounts
cgroup2 on /sys/fs/cgroup (kernels/init/job-init.c); the job moves its shell into the
child cgroup before the workload starts, so the workload and everything it forks run
there.  Cpusets: the kernel needs CONFIG_CPUSETS, and the job enables the controller
(``+cpuset`` in the root's cgroup.subtree_control) before writing ``cpuset.cpus``.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from vmm.errors import ConfigError
from vmm.machine.guestjob import LOG_PREFIX

# name: (the binary, the Debian package that installs it, how the duration is given)
WORKLOADS = {
    "stress-ng": ("stress-ng", "stress-ng", "timeout"),  # its own --timeout Ns
    "hackbench": ("hackbench", "rt-tests", "repeat"),  # runs to its end: repeated until done
}
CGROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_OUTPUT = 256 * 1024  # characters of the workload's output kept
BEGIN_RE = re.compile(r"^" + LOG_PREFIX + r"vmm-workload: begin name=(\S+) cgroup=(\S*) scx=(\S*)\r?$",
                      re.M)
END_RE = re.compile(r"^" + LOG_PREFIX + r"vmm-workload: end status=(\d+) seconds=([\d.]+) scx=(\S*)\r?$",
                    re.M)


@dataclass
class WorkloadResult:
    name: str
    status: Optional[int]  # the workload's exit status; None when it never ended
    output: str  # its own lines (stdout and stderr), without the markers
    seconds: Optional[float]  # guest time it ran
    cgroup: str = ""  # /proc/self/cgroup of the job's shell when it started the workload
    scx_before: str = ""  # /sys/kernel/sched_ext/state before and after (a scheduler given)
    scx_after: str = ""
    job_status: Optional[int] = None  # the whole job's (vmm-job: exit N)
    console_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 0


def _binary(name: str) -> Path:
    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}: expected one of {', '.join(WORKLOADS)}")
    tool, package, _ = WORKLOADS[name]
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        raise ConfigError(f"workload {name!r} needs {tool} on the host (it goes into the guest "
                          f"with its libraries): apt-get install {package}")
    return Path(path).resolve()


def workload_job(name: str, args: Sequence[str] = (), duration: float = 10, *,
                 cgroup: Optional[str] = None, cpuset: Optional[str] = None,
                 scheduler: Optional[str | Path] = None) -> tuple[str, list[str]]:
    """The guest job (shell command, --include list) that runs workload ``name`` with
    ``args`` for ``duration`` seconds; in child cgroup ``cgroup`` (its cpuset.cpus set to
    ``cpuset`` when given), under the sched_ext scheduler binary ``scheduler`` (attached
    first, detached after; the job fails with 3 when it does not attach)."""
    binary = _binary(name)
    if not 0 < duration <= 24 * 3600:
        raise ConfigError(f"workload duration {duration!r} s: give a number of seconds in (0, 86400]")
    if cgroup is not None and not CGROUP_NAME.match(cgroup):
        raise ConfigError(f"cgroup name {cgroup!r}: use letters, digits, '_', '.', '-' (a child "
                          "of /sys/fs/cgroup)")
    if cpuset is not None and (cgroup is None or not re.match(r"^[0-9,-]+$", cpuset)):
        raise ConfigError(f"cpuset {cpuset!r}: give a CPU list like '0' or '0-1' and a cgroup")
    includes = [f"{binary}:/bin/{binary.name}"]
    run_args = " ".join(shlex.quote(a) for a in args)
    secs = max(1, round(duration))
    if WORKLOADS[name][2] == "timeout":
        run = f"/bin/{binary.name} --timeout {secs}s {run_args}"
    else:
        run = (f"end=$(( $(cs) + {secs * 100} )); r=0; "
               f"while [ $(cs) -lt $end ]; do "
               f"/bin/{binary.name} {run_args} || {{ r=$?; break; }}; done; (exit $r)")
    # cs: the guest's uptime in centiseconds (busybox sh counts in integers)
    lines = ["cd /tmp", "cs() { read u _ </proc/uptime; echo ${u%.*}${u#*.}; }", "state() { cat /sys/kernel/sched_ext/state 2>/dev/null || echo none; }"]
    if scheduler is not None:
        includes.append(f"{Path(scheduler)}:/bin/vmm-scx")
        lines += ["/bin/vmm-scx > /tmp/scx.log 2>&1 & SCX=$!", "i=0",
                  "until [ \"$(state)\" = enabled ]; do i=$((i+1)); if [ $i -gt 600 ]; then "
                  "echo 'vmm-workload: the scheduler did not attach'; cat /tmp/scx.log; exit 3; fi; "
                  "sleep 0.1; done"]
    if cgroup is not None:
        g = f"/sys/fs/cgroup/{cgroup}"
        lines += [f"[ -e /sys/fs/cgroup/cgroup.procs ] || {{ echo 'vmm-workload: no cgroup2 at "
                  f"/sys/fs/cgroup (CONFIG_CGROUPS)'; exit 4; }}", f"mkdir -p {g}"]
        if cpuset is not None:
            lines += ["echo +cpuset > /sys/fs/cgroup/cgroup.subtree_control || { echo "
                      "'vmm-workload: no cpuset controller (CONFIG_CPUSETS)'; exit 4; }",
                      f"echo {cpuset} > {g}/cpuset.cpus || exit 4"]
        lines.append(f"echo $$ > {g}/cgroup.procs || exit 4")
    lines += ["CG=$(grep '^0::' /proc/self/cgroup 2>/dev/null | tr -d ' ')",  # cgroup2's line
              f"echo \"vmm-workload: begin name={name} cgroup=$CG scx=$(state)\"",
              "read t0 _ </proc/uptime",
              f"{{ {run}; }} 2>&1",
              "rc=$?",
              "read t1 _ </proc/uptime",
              "echo",
              "echo \"vmm-workload: end status=$rc seconds=$(echo \"$t1 $t0\" | awk '{printf \"%.2f\", $1-$2}') "
              "scx=$(state)\""]
    if scheduler is not None:
        lines += ["kill -INT $SCX; wait $SCX"]
    lines.append("exit $rc")
    return "\n".join(lines) + "\n", includes


def workload_result(console: str) -> WorkloadResult:
    """The workload's part of a job's console text (bounded), parsed."""
    begin = BEGIN_RE.search(console)
    if begin is None:
        return WorkloadResult("", None, "", None,
                              console_tail=console.splitlines()[-30:])
    end = END_RE.search(console, begin.end())
    body = console[begin.end():end.start() if end else len(console)].strip("\r\n")
    if len(body) > MAX_OUTPUT:
        body = "... (earlier output dropped)\n" + body[-MAX_OUTPUT:]
    res = WorkloadResult(begin.group(1), int(end.group(1)) if end else None,
                         body.replace("\r\n", "\n"), float(end.group(2)) if end else None,
                         cgroup=begin.group(2), scx_before=begin.group(3),
                         scx_after=end.group(3) if end else "")
    if end is None:
        res.console_tail = console.splitlines()[-30:]
    return res
