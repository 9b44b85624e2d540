"""vmm.scxselftests / vmm.cli_scx without a guest: the runner's output parsed (its
format as runner.c prints it, and edge cases), known failures, the table, the CLI's exit status; vmm.machine.workload's job and its parsed result."""

from pathlib import Path

import pytest

from vmm import scxselftests as st
from vmm.machine.workload import WorkloadResult, workload_job, workload_result


def stamped(lines, t0=1.0, step=0.5):
    """The job's console: each runner line stamped with the guest's uptime."""
    return "\n".join(f"@{t0 + i * step:.2f} {line}" for i, line in enumerate(lines)) + "\n"


def test_pass_fail_skip_and_durations():
    text = "[    1.0] Run /init as init process\nvmm-job: start\n" + stamped([
        "===== START =====", "TEST: create_dsq", "DESCRIPTION: Create and destroy a dsq",
        "OUTPUT:", "ok 1 create_dsq # ", "=====  END  =====",
        "===== START =====", "TEST: exit", "DESCRIPTION: Verify exit", "OUTPUT:",
        "ERR: exit.c:42", "Expected skel->data->exit_code == 0 (got -1)",
        "not ok 2 exit # ", "=====  END  =====",
        "===== START =====", "TEST: numa", "DESCRIPTION: numa", "OUTPUT:",
        "ok 3 numa # SKIP ", "=====  END  =====",
        "", "", "=============================", "", "RESULTS:", "", "PASSED:  1",
        "SKIPPED: 1", "FAILED:  1", "vmm-selftests: runner exit 0"]) + "\nvmm-job: exit 0\n"
    results, finished = st.parse_output(text, ["create_dsq", "exit", "numa", "minimal"])
    assert finished
    by = {r.name: r for r in results}
    assert [r.name for r in results] == ["create_dsq", "exit", "numa", "minimal"]
    assert [by[n].status for n in by] == ["pass", "fail", "skip", "not run"]
    assert by["create_dsq"].seconds == 2.5  # its TEST line to the next START: 5 lines of 0.5 s
    assert by["exit"].output == ["ERR: exit.c:42", "Expected skel->data->exit_code == 0 (got -1)"]
    assert by["numa"].seconds is not None and by["minimal"].seconds is None
    assert [r.name for r in st.unexpected_failures(results)] == ["exit"]
    assert st.counts(results) == {"pass": 1, "fail": 1, "skip": 1, "crash": 0, "timeout": 0,
                                  "not run": 1}


def test_a_guest_that_dies_inside_a_test_leaves_it_crashed_with_the_kernels_lines():
    text = stamped(["===== START =====", "TEST: minimal", "DESCRIPTION: x", "OUTPUT:",
                    "ok 1 minimal # ", "=====  END  =====",
                    "===== START =====", "TEST: hotplug", "DESCRIPTION: y", "OUTPUT:"]) + \
        "[   12.5] Kernel panic - not syncing: oops\n[   12.5] ---[ end Kernel panic ]---\n"
    results, finished = st.parse_output(text, ["minimal", "hotplug", "numa"])
    assert not finished
    assert [(r.name, r.status) for r in results] == [("minimal", "pass"), ("hotplug", "crash"),
                                                     ("numa", "not run")]
    assert results[1].output == ["[   12.5] Kernel panic - not syncing: oops",
                                 "[   12.5] ---[ end Kernel panic ]---"]
    assert results[1].seconds is None and results[0].seconds == 2.5


def test_output_is_bounded_and_the_first_result_of_a_name_counts():
    lines = ["===== START =====", "TEST: chatty", "OUTPUT:"] + ["x" * 5000] * 500 + \
        ["not ok 1 chatty # ", "=====  END  =====",
         "===== START =====", "TEST: chatty", "OUTPUT:", "ok 1 chatty # ", "=====  END  =====",
         "vmm-selftests: runner exit 1"]
    results, _ = st.parse_output(stamped(lines))
    (r,) = results
    assert r.status == "fail"
    assert len(r.output) == st.MAX_OUTPUT_LINES + 1 and max(map(len, r.output)) == st.MAX_LINE


def test_known_failures_file(tmp_path):
    f = tmp_path / "known"
    f.write_text("# flaky on 2 vCPUs\nexit  # see lkml\n\nnot_a_test\n")
    known = st.read_known_failures(f)
    assert known == {"exit", "not_a_test"}
    results = [st.TestResult("exit", "fail"), st.TestResult("minimal", "pass"),
               st.TestResult("hotplug", "timeout")]
    assert st.apply_known(results, known) == ["not_a_test"]
    assert [r.name for r in st.unexpected_failures(results)] == ["hotplug"]
    table = st.format_table(results)
    assert "fail (known)" in table and "timeout" in table and "(the test printed nothing)" in table
    assert st.read_known_failures(None) == set()
    with pytest.raises(st.SelftestsError, match="known-failures file .*No such file"):
        st.read_known_failures(tmp_path / "absent")


def test_guest_command_and_selection():
    assert st.select(["select_cpu_dfl", "select_cpu_dfl_nodispatch", "exit"], "dfl") == \
        ["select_cpu_dfl", "select_cpu_dfl_nodispatch"]
    cmd = st.guest_command(pattern="exit")
    assert "/bin/runner -t exit;" in cmd and "/proc/uptime" in cmd
    assert "/bin/runner -t a; /bin/runner -t 'b c';" in st.guest_command(only=["a", "b c"])
    # -t matches substrings: a name another one picked already contains is not run twice
    assert "/bin/runner -t dfl; /bin/runner -t exit;" in st.guest_command(
        only=["dfl", "select_cpu_dfl", "exit"])
    assert "echo 1 > /proc/sys/kernel/printk" in cmd  # the kernel kept off the runner's lines
    assert "printk" not in st.guest_command(quiet_kernel=False)
    # several patterns: the tests that contain one of them, the runner once per pattern
    names = ["minimal", "maximal", "select_cpu_dfl", "select_cpu_vtime", "exit"]
    assert st.select(names, "imal,vtime") == ["minimal", "maximal", "select_cpu_vtime"]
    assert "/bin/runner -t imal; /bin/runner -t vtime;" in st.guest_command(pattern="imal,vtime")
    with pytest.raises(st.SelftestsError, match="none empty"):
        st.select(names, "minimal,")


def test_the_job_gets_the_kernel_config(tmp_path):
    """libbpf reads /boot/config-$(uname -r) for common.bpf.h's __kconfig externs."""
    r = st.Runner(tmp_path / "runner", "k", tmp_path, True, 0.0, [], tmp_path / "config")
    assert r.includes() == [f"{tmp_path}/runner:/bin/runner", f"{tmp_path}/config:/etc/vmm-kconfig"]
    assert st.Runner(tmp_path / "runner", "k", tmp_path, True, 0.0, []).includes() == [
        f"{tmp_path}/runner:/bin/runner"]
    assert "cat /etc/vmm-kconfig > /boot/config-$rel" in st.guest_command()


def test_a_tree_without_selftests_says_so(tmp_path):
    with pytest.raises(st.SelftestsError, match="no tools/testing/selftests/sched_ext"):
        st.selftests_source(tmp_path)


def test_cli_refuses_a_missing_known_failures_file_before_building(tmp_path, capsys):
    from vmm import cli

    rc = cli.main(["scx", "selftests", "--known-failures", str(tmp_path / "nope")])
    assert rc != 0
    assert "known-failures file" in capsys.readouterr().err


def test_cli_build_only_prints_the_runner_without_booting(capsys):
    """make svm-setup builds the runner on the host (the lane would build it in L1)."""
    from guest_abi import built_kernel_spec
    from vmm import cli
    from vmm.scxbuild import ScxBuildError

    kernel = built_kernel_spec("scx")
    try:
        rc = cli.main(["scx", "selftests", "--build-only", "--kernel", kernel])
    except ScxBuildError as exc:  # the toolchain is missing: the message names it
        pytest.skip(str(exc))
    out = capsys.readouterr().out.strip()
    assert rc == 0 and out.endswith("/bin/runner") and Path(out).is_file(), out


# --- workloads (vmm.machine.workload) -------------------------------------------------------
def test_workload_job_and_its_result():
    pytest.importorskip("shutil").which("stress-ng") or pytest.skip("needs stress-ng: apt-get install stress-ng")
    cmd, inc = workload_job("stress-ng", ["--cpu", "2"], 5, cgroup="w")
    assert inc[0].endswith(":/bin/stress-ng")
    assert "echo $$ > /sys/fs/cgroup/w/cgroup.procs" in cmd and "--timeout 5s --cpu 2" in cmd
    console = ("vmm-job: start\nvmm-workload: begin name=stress-ng cgroup=0::/w scx=none\r\n"
               "stress-ng: info: successful run completed in 5.00s\n\n"
               "vmm-workload: end status=0 seconds=5.02 scx=none\nvmm-job: exit 0\n")
    r = workload_result(console)
    assert (r.name, r.status, r.seconds, r.cgroup, r.ok) == ("stress-ng", 0, 5.02, "0::/w", True)
    assert r.output == "stress-ng: info: successful run completed in 5.00s"
    unfinished = workload_result("vmm-workload: begin name=stress-ng cgroup= scx=none\nboom\n")
    assert unfinished.status is None and unfinished.output == "boom" and not unfinished.ok


@pytest.mark.parametrize("kw, words", [
    (dict(name="fio"), ["unknown workload 'fio'", "stress-ng"]),
    (dict(duration=0), ["duration"]),
    (dict(cgroup="../x"), ["cgroup name"]),
    (dict(cgroup="x", cpuset="all"), ["cpuset"]),
])
def test_workload_bad_input(kw, words):
    from vmm.errors import ConfigError

    args = dict(name="hackbench", args=(), duration=3)
    args.update(kw)
    with pytest.raises(ConfigError) as e:
        workload_job(args.pop("name"), args.pop("args"), args.pop("duration"), **args)
    for w in words:
        assert w in str(e.value)
    assert isinstance(WorkloadResult("x", 0, "", 1.0).ok, bool)


FAKE_RUNNER = """#!/bin/sh
# prints what tools/testing/selftests/sched_ext/runner.c prints, for two tests
for t in alpha beta; do
  [ -n "$2" ] && [ "${t#*$2}" = "$t" ] && continue
  echo '===== START ====='; echo "TEST: $t"; echo "DESCRIPTION: the $t test"; echo 'OUTPUT:'
  sleep 1
  if [ $t = beta ]; then echo 'ERR: beta.c:7' >&2; echo "not ok 2 $t # "; else echo "ok 1 $t # "; fi
  echo '=====  END  ====='
done
echo; echo 'RESULTS:'
"""


def test_the_guest_command_stamps_and_parses_for_real(tmp_path):
    """The job's command run by the job's init (PID 1 of a namespace, as in
    tests/test_guestjob.py) with a stand-in runner script (the real one would load BPF
    schedulers into the host's kernel): stamped lines, parsed, durations from them."""
    from test_guestjob import _can_run_init_in_namespace, _job_root, _run_init
    from vmm.machine import guestjob

    if not _can_run_init_in_namespace():
        pytest.skip("needs root, unshare (util-linux) and busybox-static")
    runner = tmp_path / "runner"
    runner.write_text(FAKE_RUNNER)
    runner.chmod(0o755)
    for i, (command, expect) in enumerate((
            # quiet_kernel=False: the console log level is the host kernel's here
            (st.guest_command(quiet_kernel=False), {"alpha": "pass", "beta": "fail"}),
            (st.guest_command(only=["beta"], quiet_kernel=False),
             {"alpha": "not run", "beta": "fail"}))):
        entries = guestjob.job_entries(command, [f"{runner}:/bin/runner"])
        r = _run_init(_job_root(tmp_path / str(i), "", entries))
        results, finished = st.parse_output(r.stdout, ["alpha", "beta"])
        assert finished, r.stdout + r.stderr
        assert {x.name: x.status for x in results} == expect, r.stdout
        beta = results[1]
        assert beta.output == ["ERR: beta.c:7"] and 0.9 <= beta.seconds < 10, (beta, r.stdout)
