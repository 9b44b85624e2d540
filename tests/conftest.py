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

Helpers the test modules share live in plain modules beside them (guest_abi, tinyvm,
fake_resolver, page_tables, pahole_text); the synthetic kernel images come from
fuzz.synthetic_images, which also makes the fuzz seeds. Test modules do not import
one another.
"""

from __future__ import annotations

import os
import re
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
_resumed: list[bool] = []


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
    done, started = {}, None
    for line in path.read_text().splitlines():
        what, _, nodeid = line.partition(" ")
        if what == "start":
            started = nodeid
        elif what in FINAL:
            done[nodeid] = what
            started = None if started == nodeid else started
    _resumed.append(True)
    _earlier_failures[:] = [n for n, what in done.items() if what == "failed"]
    keep = [item for item in items if item.nodeid not in done]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
    items[:] = keep
    print(f"\nsvm lane: resuming after an L1 crash: {len(done)} tests ended before it "
          f"({len(_earlier_failures)} failed), {len(keep)} to run"
          + (f"; L1 died during {started}" if started else ""))


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if _progress() is not None:
        _outcomes.pop(nodeid, None)
        _write_progress("start", nodeid)


# Why each rerun (pytest-rerunfailures, `make test-svm`) happened: -rR names only the test.
_reruns: list[tuple[str, str, str]] = []  # (nodeid, phase, failure text)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":
        _reruns.append((report.nodeid, report.when, report.longreprtext))
    if _progress() is None:
        return
    if report.outcome not in FINAL:
        _outcomes[report.nodeid] = report.outcome  # "rerun": this try does not count
    elif report.failed or (report.skipped and report.when != "teardown"):
        _outcomes.setdefault(report.nodeid, report.outcome)
    if report.when == "teardown":
        outcome = _outcomes.pop(report.nodeid, "passed")
        if outcome in FINAL:
            _write_progress(outcome, report.nodeid)


def pytest_terminal_summary(terminalreporter) -> None:
    # The text that --only-rerun's patterns (the Makefile's SVM_RERUN) matched, else the
    # failure's last line.
    patterns = terminalreporter.config.getoption("only_rerun", None) or []
    for nodeid, when, text in _reruns:
        found = next(filter(None, (re.search(p, text) for p in patterns)), None)
        why = found.group(0) if found else (text.strip().splitlines() or ["?"])[-1][:160]
        terminalreporter.write_line(f"rerun {nodeid} ({when}): {why}")
    for nodeid in _earlier_failures:
        terminalreporter.write_line(f"FAILED {nodeid} (in an earlier L1, before it crashed)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _resumed and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        # Nothing left to run is no error when the crash came after the last test.
        failed = pytest.ExitCode.TESTS_FAILED
        session.exitstatus = failed if _earlier_failures else pytest.ExitCode.OK
