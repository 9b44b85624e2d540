"""The workload job (vmm.machine.workload) run for real by the job's init on the host, as
PID 1 of its own PID and mount namespace (as tests/test_guestjob.py runs the init):
rt-tests' hackbench with its libraries, the job's markers, timing and status, and the
init's cgroup2 mount.  No cgroup is created (that would be the host's): the lane test
tests/test_workload_linux.py places work in one."""

import shutil

import pytest

from test_guestjob import _can_run_init_in_namespace, _job_root, _run_init
from vmm.machine import guestjob
from vmm.machine.workload import workload_job, workload_result

pytestmark = [
    pytest.mark.skipif(not _can_run_init_in_namespace(),
                       reason="needs root, unshare (util-linux) and busybox-static"),
    pytest.mark.skipif(shutil.which("hackbench") is None,
                       reason="needs hackbench: apt-get install rt-tests (make deps)")]


def test_hackbench_job_runs_for_its_duration_and_the_init_mounts_cgroup2(tmp_path):
    command, includes = workload_job("hackbench", ["-p", "-g", "1", "-l", "20"], 2)
    command = "grep -c ' /sys/fs/cgroup cgroup2 ' /proc/mounts\n" + command
    r = _run_init(_job_root(tmp_path, "", guestjob.job_entries(command, includes)), timeout=120)
    out = r.stdout
    assert "\n1\n" in out, out + r.stderr  # the init mounted cgroup2 on /sys/fs/cgroup
    res = workload_result(out)
    assert (res.name, res.status) == ("hackbench", 0), out
    assert res.output.count("Time:") >= 1 and res.seconds >= 2, out
    assert guestjob.job_status(out) == 0, out


@pytest.mark.skipif(shutil.which("stress-ng") is None,
                    reason="needs stress-ng: apt-get install stress-ng (make deps)")
def test_stress_ng_runs_from_its_included_libraries(tmp_path):
    """Debian's stress-ng (27 shared libraries) goes in with --include and runs: one CPU
    stressor for 1 s, its own summary and status back through the markers."""
    command, includes = workload_job("stress-ng", ["--cpu", "1", "--metrics-brief"], 1)
    r = _run_init(_job_root(tmp_path, "", guestjob.job_entries(command, includes)), timeout=120)
    res = workload_result(r.stdout)
    assert (res.name, res.status) == ("stress-ng", 0), r.stdout + r.stderr
    assert "successful run completed" in res.output, r.stdout
