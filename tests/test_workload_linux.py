"""Real workloads in the guest job (vmm.session_workload.run_workload): Debian's
stress-ng, included from the host with its libraries, under the tree's scx_simple; and
a job placed in a child cgroup (the init mounts cgroup2 on /sys/fs/cgroup).

Guest user space makes system calls: VMX/SVM, or the SVM lane (make test-svm).
stress-ng and scx_simple come from the host (make deps, make svm-setup).
"""

import shutil

import pytest

from guest_abi import built_kernel_spec, guest_syscall_marks

pytestmark = [pytest.mark.slow, pytest.mark.svm, *guest_syscall_marks(),
              pytest.mark.skipif(shutil.which("stress-ng") is None,
                                 reason="needs stress-ng on the host: apt-get install stress-ng (make deps)")]


def test_stress_ng_under_scx_simple_in_a_child_cgroup():
    """stress-ng's CPU stressors for a few seconds with scx_simple attached, run from a
    child cgroup: its own output and status come back, the scheduler stays enabled
    through it, and the workload's process is in the cgroup (its /proc/self/cgroup)."""
    from vmm.scxbuild import ScxBuildError
    from vmm.session_workload import run_workload

    kernel = built_kernel_spec("scx")
    try:
        r = run_workload("stress-ng", ["--cpu", "2", "--metrics-brief"], 5, kernel=kernel,
                         cpus=2, scheduler="simple", cgroup="vmm-work")
    except ScxBuildError as exc:
        if "apt-get install" in str(exc):
            pytest.skip(str(exc))
        raise
    print(r.output)
    assert r.job_status == 0 and r.status == 0, (r.job_status, r.status, r.output, r.console_tail)
    assert "successful run completed" in r.output, r.output
    assert r.cgroup == "0::/vmm-work", r.cgroup
    assert (r.scx_before, r.scx_after) == ("enabled", "enabled"), (r.scx_before, r.scx_after)
    assert 4.5 <= r.seconds < 60, r.seconds


def test_hackbench_runs_for_its_duration():
    """rt-tests' hackbench (pipes, few groups: the guest is small), repeated for 3 s."""
    from vmm.session_workload import run_workload

    if shutil.which("hackbench") is None:
        pytest.skip("needs hackbench on the host: apt-get install rt-tests (make deps)")
    r = run_workload("hackbench", ["-p", "-g", "2", "-l", "50"], 3, kernel=built_kernel_spec("scx"),
                     cpus=2, cgroup="bench")
    print(r.output)
    assert r.status == 0 and r.job_status == 0, (r.status, r.output, r.console_tail)
    assert "Time:" in r.output, r.output
    assert r.cgroup == "0::/bench" and r.seconds >= 3, (r.cgroup, r.seconds)
