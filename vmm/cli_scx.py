"""`vmm scx selftests`: the kernel's own sched_ext selftests, run in a guest, as a table.

    vmm scx selftests --kernel build:7.3+scx [--filter PATTERN] [--json]
                      [--known-failures FILE] [--cpus N]

Builds the tree's runner (vmm.scxselftests, cached), boots the kernel with the runner
as the guest job, parses the per-test results (the runner's own exit status is 0 even
when tests fail), prints a table and exits 1 when a test that is not skipped failed,
crashed or hung and is not listed in the known-failures file.  A guest that dies or
hangs inside a test is reported as that test's crash (with the guest's last console
lines) and a fresh boot goes on with the tests after it, at most ``--restarts`` times.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .machine.guestjob import LOG_PREFIX
from .scxselftests import (Runner, SelftestsError, TestResult, apply_known, build_runner, counts,
                           format_table, guest_command, parse_output, patterns_of,
                           read_known_failures, select, to_json, unexpected_failures)

EXIT_OK, EXIT_FAILED = 0, 1
CONSOLE_TAIL = 30  # the guest's lines kept for a crashed test


@dataclass
class SelftestsRun:
    kernel: str
    runner: Runner
    results: list[TestResult]
    boots: int
    seconds: float
    unknown_known: list[str] = field(default_factory=list)  # known-failures names no test has
    consoles: list[str] = field(default_factory=list)  # each boot's console text (bounded)

    @property
    def failures(self) -> list[TestResult]:
        return unexpected_failures(self.results)

    def table(self) -> str:
        return format_table(self.results)

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "runner": str(self.runner.binary), "boots": self.boots,
                "seconds": round(self.seconds, 1), "counts": counts(self.results),
                "unexpected_failures": [r.name for r in self.failures],
                "known_failures_not_found": self.unknown_known, "tests": to_json(self.results)}


def _boot_and_run(kernel: str, runner: Runner, command: str, *, cpus: int, memory: str,
                  boot_timeout: float, test_timeout: float, t0: float,
                  say: Callable[[str], None]) -> tuple[str, Optional[str]]:
    """One boot running ``command``; the console text and, when the guest did not get to
    the runner's end, why (``crash: ...`` or ``timeout: ...``)."""
    from .session import Machine  # the session floor: this module is an entry point

    m = Machine(kernel=kernel, cpus=cpus, memory=memory, console=None, exec=command,
                include=runner.includes())
    m.start()
    why = None
    seen, started, last = -1, 0, time.monotonic()
    limit = boot_timeout  # until the first test starts, then per test
    try:
        while True:
            position = m.console_position()
            if position != seen:  # something new: look at it (the window is bounded)
                seen = position
                text = m.console_text()
                names = _TEST_LINE.findall(text)
                if len(names) > started:
                    for name in names[started:]:
                        say(f"vmm scx selftests: [{time.monotonic() - t0:6.1f}s] {name}")
                    started, last, limit = len(names), time.monotonic(), test_timeout
                if _END_LINE.search(text):
                    m.wait(timeout=60)  # the init reboots after the job
                    break
            if m.exit is not None:
                time.sleep(0.2)  # the console's last drain
                if not _END_LINE.search(m.console_text()):
                    why = f"crash: the guest ended ({m.exit}) before the runner did"
                break
            if time.monotonic() - last > limit:
                why = f"timeout: nothing from the runner for {limit:g} s"
                break
            time.sleep(0.5)
        text = m.console_text()
    finally:
        m.stop()
    return text, why


_TEST_LINE = re.compile(r"^" + LOG_PREFIX + r"@[\d.]+ TEST: (\S+)", re.M)
_END_LINE = re.compile(r"^" + LOG_PREFIX + r"@[\d.]+ vmm-selftests: runner exit", re.M)


def run_selftests(kernel: str = "build:7.3+scx", *, pattern: Optional[str] = None,
                  known_failures: Optional[str] = None, cpus: int = 2, memory: str = "512M",
                  boot_timeout: float = 300, test_timeout: float = 300, restarts: int = 2,
                  progress: Optional[Callable[[str], None]] = None) -> SelftestsRun:
    """Build the runner, run the selftests in the guest (again after a crash or hang,
    from the next test on) and return the results, known failures marked."""
    t0 = time.monotonic()
    say = progress or (lambda line: None)
    known = read_known_failures(known_failures)  # a bad file fails before any build or boot
    patterns_of(pattern)  # so does a bad filter
    runner = build_runner(kernel, progress=progress)
    expected = select(runner.tests, pattern)
    if not expected:
        raise SelftestsError(f"no test of the runner matches {pattern!r}; its tests: "
                             f"{', '.join(runner.tests)}")
    final: dict[str, TestResult] = {}
    consoles: list[str] = []
    command = guest_command(pattern=pattern)
    boots = 0
    while True:
        boots += 1
        text, why = _boot_and_run(kernel, runner, command, cpus=cpus, memory=memory,
                                  boot_timeout=boot_timeout, test_timeout=test_timeout,
                                  t0=t0, say=say)
        consoles.append(text)
        results, _ = parse_output(text)
        if why is not None and not results:  # the runner never started a test
            from .machine.guestjob import init_failure
            cause = init_failure(text) or "\n".join(text.splitlines()[-CONSOLE_TAIL:])
            raise SelftestsError(f"the guest never ran a selftest ({why}):\n{cause}")
        for r in results:
            if r.name in expected and r.name not in final:
                final[r.name] = r
                if r.status == "crash" and why is not None:  # the test the guest died in
                    r.status = why.split(":")[0]
                    r.output += [f"-- {why}; the guest's last console lines:"] + [
                        line.rstrip("\r") for line in text.splitlines()[-CONSOLE_TAIL:]]
                    say(f"vmm scx selftests: {why} (in {r.name})")
        remaining = [n for n in expected if n not in final]
        if why is None or not remaining or boots > restarts:
            break
        command = guest_command(only=remaining)  # a fresh boot, from the next test on
    ordered = [final.get(n) or TestResult(n, "not run") for n in expected]
    unknown = apply_known(ordered, known)
    return SelftestsRun(runner.kernel, runner, ordered, boots, time.monotonic() - t0, unknown,
                        consoles)


def add_selftests_parser(ssub) -> None:
    p = ssub.add_parser("selftests", help="build and run the kernel's sched_ext selftests "
                                          "(tools/testing/selftests/sched_ext) in a guest")
    p.add_argument("--kernel", default="build:7.3+scx", help="store kernel spec (default "
                   "build:7.3+scx: the selftests need its NET/FTRACE/BPF_EVENTS)")
    p.add_argument("--filter", metavar="PATTERN", default=None,
                   help="only the tests whose name contains PATTERN (the runner's -t); "
                        "several, comma-separated: those that contain one of them")
    p.add_argument("--known-failures", metavar="FILE", default=None,
                   help="test names (one a line, '#' comments) whose failure does not fail "
                        "the run; nothing is silenced without it")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory", default="512M")
    p.add_argument("--test-timeout", type=float, default=300,
                   help="seconds a test may run before it counts as hung (default 300)")
    p.add_argument("--restarts", type=int, default=2,
                   help="boots after a crash or hang, going on with the next test (default 2)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find cached) the runner and print its path; no boot (make "
                        "svm-setup: the SVM lane has no network and builds slowly)")


def cmd_selftests(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.build_only:
        runner = build_runner(args.kernel, progress=say)
        print(runner.binary)
        return EXIT_OK
    run = run_selftests(args.kernel, pattern=args.filter, known_failures=args.known_failures,
                        cpus=args.cpus, memory=args.memory, test_timeout=args.test_timeout,
                        restarts=args.restarts, progress=say)
    if args.json:
        print(json.dumps(run.to_dict(), indent=2))
    else:
        print(run.table())
        print(f"({run.kernel}, {run.boots} boot(s), {run.seconds:.0f} s)")
    for name in run.unknown_known:
        say(f"vmm scx selftests: warning: known failure {name!r} is not a test of this runner")
    if run.failures:
        say("vmm scx selftests: failed: " + ", ".join(r.name for r in run.failures))
        return EXIT_FAILED
    return EXIT_OK
