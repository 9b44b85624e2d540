"""What every test module shares: the one /dev/kvm rule and machines stopped for you.

- A test (or module) marked ``pytest.mark.kvm`` is skipped when /dev/kvm cannot be
  opened for reading and writing by this user (missing, or no permission: os.access,
  so a non-root user outside the kvm group skips too instead of failing). It is the
  only such rule; guest_abi.kvm_problem() goes further (it opens KVM) for the tests
  that need a working KVM, not only the device.
- ``started``: a fixture that starts a Machine and stops it when the test ends, pass
  or fail (the boot, try, finally: stop() the guest tests repeated).
- In the SVM lane (``VMM_SVM_PROGRESS`` set by scripts/svm_lane.py): each test that
  starts and each outcome is written down in that file, outside L1. When the lane's
  emulator crashes L1 it runs the command again in a fresh L1 (``--l1-retries``): the run
  then leaves out the tests that passed or skipped before the crash, runs the rest, and
  still fails for the tests that failed before it.
- A test that pytest-rerunfailures ran again gets a summary line saying why: the text
  its ``--only-rerun`` patterns (the Makefile's SVM_RERUN) matched, else its last line.
- In the SVM lane, a test whose last rerun still failed with one of those patterns (the
  emulator's SVM fault) does not count as failed the first time: the run stops and asks
  scripts/svm_lane.py for a fresh L1 (its FRESH_L1), where it resumes with that test.
  An L1 that faulted once tends to fault again (svm_lane.py's docstring has the figures);
  each test gets one fresh L1, and only while ``--l1-retries`` has one left.
- In the SVM lane a test that runs past ``VMM_LANE_TEST_LIMIT_S`` (600 s unless set)
  is a hang: faulthandler prints every thread's stack to the console and ends the run
  (status 1). That tells a hang of ours (stacks on the console) from an L1 that froze
  (nothing at all), which svm_lane.py's ``--silence`` treats as an L1 crash.

Helpers the test modules share live in plain modules beside them (guest_abi, tinyvm,
fake_resolver, page_tables, pahole_text); the synthetic kernel images come from
fuzz.synthetic_images, which also makes the fuzz seeds. Test modules do not import
one another.
"""

from __future__ import annotations

import faulthandler
import os
import re
import sys
from pathlib import Path

import pytest

KVM_DEVICE = "/dev/kvm"


def kvm_missing() -> str | None:
    """None when this user can open /dev/kvm read-write, else why not."""
    if not os.path.exists(KVM_DEVICE):
        return f"needs {KVM_DEVICE} (not present on this host)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"needs {KVM_DEVICE} read-write (this user may not open it: join the kvm group)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") is not None:
        why = kvm_missing()
        if why:
            pytest.skip(why)


@pytest.fixture
def started():
    """``started(machine)`` starts the machine and returns it; every machine started so
    is stopped when the test ends."""
    machines = []

    def start(machine):
        machines.append(machine)
        machine.start()
        return machine

    yield start
    for machine in reversed(machines):
        machine.stop()


# --- resuming a run after the SVM lane's L1 crashed (scripts/svm_lane.py --l1-retries) --
FINAL = ("passed", "failed", "skipped")  # a rerun's "rerun" reports are not final
_outcomes: dict[str, str] = {}
_earlier_failures: list[str] = []
_why: dict[str, str] = {}  # a failed test's first words of its error (the progress file's "why")
_resumed: list[bool] = []
_console: list = []  # a copy of stderr as it was before pytest captured it
LANE_TEST_LIMIT_S = 600  # the lane's longest test takes ~150 s; a boot wait gives up at 300


def _progress() -> Path | None:
    path = os.environ.get("VMM_SVM_PROGRESS")
    return Path(path) if path else None


def _write_progress(what: str, nodeid: str) -> None:
    with open(_progress(), "a") as f:
        f.write(f"{what} {nodeid}\n")
        f.flush()
        os.fsync(f.fileno())  # L1 may die the next moment: the host must see it


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = _progress()
    if path is None or not path.exists():
        return
    done, started, fresh = {}, None, None
    for line in path.read_text().splitlines():
        what, _, nodeid = line.partition(" ")
        if what == "start":
            started = nodeid
        elif what in FINAL:
            done[nodeid] = what
            started = None if started == nodeid else started
        elif what == FRESH_L1_LINE:
            _fresh_given.add(nodeid)
            fresh, started = nodeid, None
        elif what == "why":
            failed, _, words = nodeid.partition("\t")
            _why[failed] = words
    _resumed.append(True)
    _earlier_failures[:] = [n for n, what in done.items() if what == "failed"]
    keep = [item for item in items if item.nodeid not in done]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
    items[:] = keep
    why = (f"in a fresh L1, for {fresh} (the lane's SVM fault outlived its reruns)"
           if fresh and not started else "after an L1 crash")
    print(f"\nsvm lane: resuming {why}: {len(done)} tests ended before it "
          f"({len(_earlier_failures)} failed), {len(keep)} to run"
          + (f"; L1 died during {started}" if started else ""))


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if _progress() is not None:
        _outcomes.pop(nodeid, None)
        _write_progress("start", nodeid)
        # faulthandler's own C thread: it prints and exits even while a thread holds the
        # GIL or sits in an ioctl, where a Python timer would wait with it.
        limit = float(os.environ.get("VMM_LANE_TEST_LIMIT_S", LANE_TEST_LIMIT_S))
        faulthandler.dump_traceback_later(limit, exit=True, file=_console[0])


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    if _progress() is not None:
        faulthandler.cancel_dump_traceback_later()
    _fresh_l1_after(nodeid)


# Why each rerun (pytest-rerunfailures, `make test-svm`) happened: -rR names only the test.
_reruns: list[tuple[str, str, str]] = []  # (nodeid, phase, failure text)


# --- a fresh L1 for a test the lane's SVM fault followed through its reruns -----------
FRESH_L1 = 75  # scripts/svm_lane.py's FRESH_L1: "run me again in a fresh L1"
FRESH_L1_LINE = "fresh-l1"  # its line in the progress file
_rerun_patterns: list[str] = []  # --only-rerun's (the Makefile's SVM_RERUN)
_fresh_given: set[str] = set()  # tests that had their fresh L1 (from the progress file)
_fresh_wanted: list[tuple[str, str]] = []  # (nodeid, the fault's words): at most one


def pytest_configure(config: pytest.Config) -> None:
    _rerun_patterns[:] = config.getoption("only_rerun", None) or []
    if _progress() is not None and not _console:
        # The console itself: pytest captures fd 2 while a test runs, and a hang's stacks
        # written there would go with the process.  (Capture is suspended here.)
        _console.append(os.fdopen(os.dup(sys.stderr.fileno()), "w"))


def _fresh_l1_left() -> int:
    """How many fresh L1s svm_lane.py may still boot for this run (0 outside the lane)."""
    path = os.environ.get("VMM_SVM_FRESH_L1")
    try:
        return int(Path(path).read_text().strip()) if path else 0
    except (OSError, ValueError):
        return 0


def _lane_fault(report: pytest.TestReport) -> str | None:
    """The words of the lane's SVM fault in a failed setup or call, if it is one that
    should get a fresh L1 instead of counting as failed."""
    if (not report.failed or report.when == "teardown" or _progress() is None
            or report.nodeid in _fresh_given or _fresh_wanted or not _fresh_l1_left()):
        return None
    return _rerun_words(report.longreprtext)


def _rerun_words(text: str) -> str | None:
    """The words of ``text`` that --only-rerun's patterns (the Makefile's SVM_RERUN)
    match, or None."""
    found = next(filter(None, (re.search(p, text) for p in _rerun_patterns)), None)
    return found.group(0) if found else None


def _fresh_l1_after(nodeid: str) -> None:
    if _fresh_wanted and _fresh_wanted[0][0] == nodeid:
        why = f"{nodeid}: {_fresh_wanted[0][1]}"
        _write_progress(FRESH_L1_LINE, nodeid)
        Path(os.environ["VMM_SVM_FRESH_L1"]).write_text(why + "\n")
        pytest.exit(f"the lane's SVM fault outlived the reruns of {why}: "
                    "asking scripts/svm_lane.py for a fresh L1", returncode=FRESH_L1)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":
        _reruns.append((report.nodeid, report.when, report.longreprtext))
    if _progress() is None:
        return
    fault = _lane_fault(report)
    if fault is not None:
        _fresh_wanted.append((report.nodeid, fault))
        _outcomes[report.nodeid] = FRESH_L1_LINE  # not final: the fresh L1 runs it again
        return
    if _outcomes.get(report.nodeid) == FRESH_L1_LINE and report.when != "teardown":
        return
    if report.outcome not in FINAL:
        _outcomes[report.nodeid] = report.outcome  # "rerun": this try does not count
    elif report.failed or (report.skipped and report.when != "teardown"):
        _outcomes.setdefault(report.nodeid, report.outcome)
        if report.failed:
            _why.setdefault(report.nodeid, _error_words(report))
    if report.when == "teardown":
        outcome = _outcomes.pop(report.nodeid, "passed")
        if outcome == "failed" and report.nodeid in _why:
            # A later L1 that resumes the run names the failure with its cause: CI shows
            # the end of the output, and the test's own report went by in an earlier L1.
            _write_progress("why", f"{report.nodeid}\t{_why[report.nodeid]}")
        if outcome in FINAL:
            _write_progress(outcome, report.nodeid)


def _error_words(report: pytest.TestReport, limit: int = 400) -> str:
    """The start of a failure's error message, on one line."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else (report.longreprtext.strip() or "?")
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())[:limit]


def pytest_terminal_summary(terminalreporter) -> None:
    # The text that --only-rerun's patterns (the Makefile's SVM_RERUN) matched, else the
    # failure's last line.
    for nodeid, when, text in _reruns:
        why = _rerun_words(text) or (text.strip().splitlines() or ["?"])[-1][:160]
        terminalreporter.write_line(f"rerun {nodeid} ({when}): {why}")
    for nodeid in _earlier_failures:
        why = f": {_why[nodeid]}" if nodeid in _why else ""
        terminalreporter.write_line(f"FAILED {nodeid} (in an earlier L1){why}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _resumed and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        # Nothing left to run is no error when the crash came after the last test.
        failed = pytest.ExitCode.TESTS_FAILED
        session.exitstatus = failed if _earlier_failures else pytest.ExitCode.OK
