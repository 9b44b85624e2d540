"""scripts/svm_lane.py without booting anything: the pieces that decide what runs in L1."""

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lane():
    spec = importlib.util.spec_from_file_location("svm_lane", ROOT / "scripts" / "svm_lane.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_modinfo_depends(lane):
    ko = b"\x7fELF...\0license=GPL\0depends=kvm,ccp\0retpoline=Y\0name=kvm_amd\0"
    assert lane._modinfo_depends(ko) == ["kvm", "ccp"]
    assert lane._modinfo_depends(b"\0depends=\0name=irqbypass\0") == []
    assert lane._modinfo_depends(b"no modinfo here") == []


def test_run_script_runs_the_command_as_given(lane, tmp_path, monkeypatch):
    """run.sh (what L1 executes after chroot) keeps every argument intact, runs in the
    given directory with the sane environment and passes PYTHONPATH/VMM_* through."""
    monkeypatch.setenv("PYTHONPATH", "/some/where")
    monkeypatch.setenv("VMM_EXAMPLE", "a b")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    monkeypatch.setenv("PATH", "/opt/py/bin:relative/bin:/usr/bin")
    cmd = ["python3", "-c", "import os, sys; print(sys.argv[1:], os.getcwd())", "it's", "$HOME", "a  b"]
    script = lane._run_script(cmd, str(tmp_path))
    assert "UNRELATED_SECRET" not in script
    assert "export PYTHONUNBUFFERED=1" in script and "export LANG=C.UTF-8" in script
    assert "export PATH=/opt/py/bin:/usr/bin:/usr/local/sbin" in script  # relative entry dropped
    # Run it here (without the lane's identity file): the command sees exactly its argv.
    script = script.replace("$(cat /run/svm-lane/identity)", "test")
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{['it' + chr(39) + 's', '$HOME', 'a  b']} {tmp_path}"


def test_run_script_status_is_the_commands(lane, tmp_path):
    script = lane._run_script(["sh", "-c", "exit 7"], str(tmp_path)).replace(
        "$(cat /run/svm-lane/identity)", "test")
    assert subprocess.run(["sh", "-c", script]).returncode == 7
    script = lane._run_script(["true"], str(tmp_path / "missing"))
    assert subprocess.run(["sh", "-c", script.replace("$(cat /run/svm-lane/identity)", "")],
                          stderr=subprocess.DEVNULL).returncode == 126


def test_qemu_command_shares_the_host_root_read_only(lane, tmp_path):
    manifest = {"qemu": "/q", "vmlinuz": "/k", "initramfs": "/i"}
    argv = lane.qemu_command(manifest, tmp_path, 2, "6G")
    joined = " ".join(shlex.quote(a) for a in argv)
    assert "-cpu max,+svm,+npt" in joined and "-accel tcg,thread=multi" in joined
    root = argv[argv.index("-virtfs") + 1]
    assert root.startswith("local,path=/,") and "readonly=on" in root and "multidevs=remap" in root
    assert "-netdev" not in argv and "-nic" not in argv  # no network in L1


def test_missing_libraries_reads_depends(lane, monkeypatch):
    have = {"libc6", "zlib1g"}
    monkeypatch.setattr(lane, "_host_satisfies", lambda dep: dep.split()[0] in have)
    depends = ("libc6 (>= 2.34), libfdt1 (>= 1.6.1), libfoo1 | libbar2, zlib1g (>= 1:1.2.0), "
               "qemu-system-common (= 1:10.0.2), seabios (>> 1.16.3-1~)")
    assert lane._missing_libraries(depends) == ["libfdt1", "libfoo1"]


def test_run_script_points_pytest_at_a_progress_file_outside_l1(lane, tmp_path):
    script = lane._run_script(["true"], str(tmp_path))
    assert "export VMM_SVM_PROGRESS=/run/svm-lane/progress" in script  # the io share


@pytest.fixture
def fake_l1(lane, monkeypatch):
    """A stand-in for QEMU+L1: its first boot 'crashes' (prints a kernel panic, ends
    without the command's status), every later one writes status 3."""
    l1 = (r'io=$1; if [ ! -e "$io/crashed" ]; then touch "$io/crashed"; '
          r'echo "[  752.390816] Kernel panic - not syncing: corrupted stack end detected"; exit 0; fi; '
          r'echo "svm-lane: L1 up after 1.0 s: fake"; echo 3 > "$io/status"')
    monkeypatch.setattr(lane, "setup", lambda: {})
    monkeypatch.setattr(lane, "qemu_command", lambda manifest, io, cpus, mem: ["sh", "-c", l1, "l1", str(io)])


def test_an_l1_crash_is_a_lane_failure_that_names_the_panic(lane, fake_l1, tmp_path, capsys):
    assert lane.run(["true"], str(tmp_path)) == lane.LANE_FAILED
    out = "".join(capsys.readouterr())
    assert "FAILED: L1 ended (QEMU status 0) without the command's status: L1's kernel crashed" in out
    assert "Kernel panic - not syncing: corrupted stack end detected" in out


def test_l1_retries_run_the_command_again_in_a_fresh_l1(lane, fake_l1, tmp_path, capsys):
    assert lane.run(["true"], str(tmp_path), l1_retries=2) == 3
    out = "".join(capsys.readouterr())
    assert "running it again in a fresh L1 (L1 boot 2 of 3)" in out
    assert "command exited 3" in out and "2 L1 boots" in out
    # No fresh L1 when too little of --timeout is left for it to do anything.
    assert lane.run(["true"], str(tmp_path), timeout=60, l1_retries=2) == lane.LANE_FAILED
    assert "s left of --timeout" in capsys.readouterr().err


@pytest.fixture
def fake_faulty_l1(lane, monkeypatch):
    """A stand-in for QEMU+L1 whose first command asks for a fresh L1 (as tests/conftest.py
    does after the lane's SVM fault outlived a test's reruns); the next one exits 0."""
    l1 = (r'io=$1; echo "svm-lane: L1 up after 1.0 s: fake"; '
          r'if [ ! -e "$io/asked" ]; then touch "$io/asked"; '
          r'echo "tests/x.py::t: holds the host'"'"'s state" > "$io/fresh-l1"; echo 75 > "$io/status"; '
          r'else echo 0 > "$io/status"; fi')
    monkeypatch.setattr(lane, "setup", lambda: {})
    monkeypatch.setattr(lane, "qemu_command", lambda manifest, io, cpus, mem: ["sh", "-c", l1, "l1", str(io)])


def test_a_command_may_ask_for_a_fresh_l1(lane, fake_faulty_l1, tmp_path, capsys):
    assert lane.run(["true"], str(tmp_path), l1_retries=1) == 0
    out = "".join(capsys.readouterr())
    assert "the command asked for a fresh L1 (tests/x.py::t: holds the host's state)" in out
    assert "running it again in a fresh L1 (L1 boot 2 of 2)" in out
    # With no L1 boot left the run fails (conftest.py does not ask then: it reads 0).
    assert lane.run(["true"], str(tmp_path)) == lane.LANE_FAILED


def test_status_75_without_asking_is_the_commands_own(lane, monkeypatch, tmp_path):
    l1 = r'io=$1; echo 75 > "$io/status"'
    monkeypatch.setattr(lane, "setup", lambda: {})
    monkeypatch.setattr(lane, "qemu_command", lambda manifest, io, cpus, mem: ["sh", "-c", l1, "l1", str(io)])
    assert lane.run(["true"], str(tmp_path), l1_retries=2) == 75


FAULTY_TEST = '''
import os, pytest
from pathlib import Path

@pytest.fixture(scope="module")
def booted():
    if not Path(os.environ["FAULT_DONE"]).exists():
        raise RuntimeError("a vCPU holds the host's state, not the guest's")
    return 1

def test_first():
    pass

def test_boots(booted):
    assert booted == 1

def test_after(booted):
    assert booted == 1
'''


def _lane_pytest(tmp_path: Path, fresh_left: int):
    """Runs tests/conftest.py with FAULTY_TEST as `make test-svm` runs pytest in L1 (a
    progress file and a fresh-L1 file outside it); returns a function that runs it."""
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_faulty.py").write_text(FAULTY_TEST)
    io = tmp_path / "io"
    io.mkdir()
    (io / "fresh-l1").write_text(f"{fresh_left}\n")
    env = dict(os.environ, VMM_SVM_PROGRESS=str(io / "progress"),
               VMM_SVM_FRESH_L1=str(io / "fresh-l1"), FAULT_DONE=str(tmp_path / "done"))

    def run_pytest():
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rR", "--reruns", "1",
             "--only-rerun", "holds the host's state", "test_faulty.py"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return io, run_pytest


def test_conftest_asks_for_a_fresh_l1_when_the_fault_outlives_the_reruns(tmp_path):
    """tests/conftest.py in a pytest run as the lane runs it: the fault's test stops the
    run with FRESH_L1 instead of failing; the next run (a fresh L1) resumes with it."""
    io, run_pytest = _lane_pytest(tmp_path, fresh_left=1)
    first = run_pytest()
    assert first.returncode == 75, first.stdout + first.stderr
    assert (io / "fresh-l1").read_text() == "test_faulty.py::test_boots: holds the host's state\n"
    lines = (io / "progress").read_text().splitlines()
    assert "passed test_faulty.py::test_first" in lines
    assert "fresh-l1 test_faulty.py::test_boots" in lines
    assert not any(line.startswith("failed") for line in lines)
    # The fresh L1: the fault is gone; test_first is not run again.
    (tmp_path / "done").touch()
    (io / "fresh-l1").write_text("0\n")
    second = run_pytest()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming in a fresh L1, for test_faulty.py::test_boots" in second.stdout
    assert "2 passed" in second.stdout


def test_conftest_fails_the_test_when_no_fresh_l1_is_left(tmp_path):
    io, run_pytest = _lane_pytest(tmp_path, fresh_left=0)
    run = run_pytest()
    assert run.returncode == 1, run.stdout
    assert "rerun test_faulty.py::test_boots (setup): holds the host's state" in run.stdout
    assert "failed test_faulty.py::test_boots" in (io / "progress").read_text().splitlines()
    # A later L1 that resumes the run names the earlier failure with its error's words
    # (CI shows the end of the output; the test's own report went by in the earlier L1).
    again = run_pytest()
    assert again.returncode == 1, again.stdout
    assert ("FAILED test_faulty.py::test_boots (in an earlier L1): RuntimeError: a vCPU holds "
            "the host's state, not the guest's") in again.stdout, again.stdout


def test_a_silent_l1_is_taken_as_frozen_and_run_again(lane, monkeypatch, tmp_path, capsys):
    """--silence: an L1 that prints nothing for that long is killed, and the run goes on
    in a fresh L1 as after a crash (one CI run's L1 stayed silent until --timeout)."""
    l1 = (r'io=$1; echo "svm-lane: L1 up after 1.0 s: fake"; '
          r'if [ ! -e "$io/froze" ]; then touch "$io/froze"; exec sleep 60; fi; echo 0 > "$io/status"')
    monkeypatch.setattr(lane, "setup", lambda: {})
    monkeypatch.setattr(lane, "qemu_command", lambda manifest, io, cpus, mem: ["sh", "-c", l1, "l1", str(io)])
    assert lane.run(["true"], str(tmp_path), l1_retries=1, silence=1) == 0
    out = "".join(capsys.readouterr())
    assert "without the command's status: L1 printed nothing for 1 s: it froze" in out
    assert "crashed" not in out
    assert "command exited 0" in out and "2 L1 boots" in out


HUNG_TEST = '''
import time

def test_first():
    pass

def test_hangs():
    time.sleep(60)
'''


def test_conftest_ends_a_lane_run_whose_test_hangs_with_its_stacks(tmp_path):
    """A test past VMM_LANE_TEST_LIMIT_S in the lane: every thread's stack on the console
    (not in pytest's capture, which dies with the process) and the run ends, status 1."""
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_hung.py").write_text(HUNG_TEST)
    env = dict(os.environ, VMM_SVM_PROGRESS=str(tmp_path / "progress"), VMM_LANE_TEST_LIMIT_S="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hung.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Timeout (0:00:01)!" in run.stderr
    assert 'test_hung.py", line 8 in test_hangs' in run.stderr
    assert (tmp_path / "progress").read_text().splitlines()[-1] == "start test_hung.py::test_hangs"
