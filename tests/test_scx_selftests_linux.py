"""The kernel's own sched_ext selftests (tools/testing/selftests/sched_ext) in a guest:
`vmm scx selftests` on our build:7.3+scx kernel, its pass count checked against the
baseline recorded for that kernel (tests/data/scx_selftests_baseline.json).

Guest user space makes system calls: VMX/SVM, or the SVM lane (make test-svm).  The
runner is built on the host first (clang; make svm-setup does it): the lane has no
network and builds slowly.  Set VMM_SELFTESTS_CONSOLE=1 to print each boot's console
(how the recorded output of tests/test_scx_selftests.py was got).

The baseline holds every test's verdict (a full run) and the lane's ``ci_filter``: a
representative set cheap enough for CI (README "The kernel's sched_ext selftests" says
what each costs).  The full set: VMM_SELFTESTS_FILTER=all.
"""

import json
import os
from pathlib import Path

import pytest

from guest_abi import built_kernel_spec, guest_syscall_marks

pytestmark = [pytest.mark.slow, pytest.mark.svm, *guest_syscall_marks()]

BASELINE = Path(__file__).parent / "data" / "scx_selftests_baseline.json"


def _run(pattern=None):
    from vmm.cli_scx import run_selftests
    from vmm.scxbuild import ScxBuildError

    kernel = built_kernel_spec("scx")
    try:
        run = run_selftests(kernel, pattern=pattern, cpus=2, test_timeout=240,
                            progress=lambda line: print(line, flush=True))
    except ScxBuildError as exc:
        if "apt-get install" in str(exc):  # the toolchain is missing: the message names it
            pytest.skip(str(exc))
        raise
    print(run.table())
    print(f"{run.kernel}: {run.boots} boot(s), {run.seconds:.0f} s")
    if os.environ.get("VMM_SELFTESTS_CONSOLE"):
        for i, text in enumerate(run.consoles):
            print(f"----- console of boot {i + 1} -----\n{text}\n----- end of console -----")
    return run


def _pattern(base):
    """The lane runs the baseline's ``ci_filter`` (the full set costs more than CI's lane
    budget); VMM_SELFTESTS_FILTER=all runs every test, any other value those it names."""
    wanted = os.environ.get("VMM_SELFTESTS_FILTER")
    if wanted is None:
        return base.get("ci_filter") if base else None
    return None if wanted in ("", "all") else wanted


def test_selftests_pass_count_against_the_baseline():
    """Every test the baseline says passes on our kernel passes, and none crashes the
    guest; a test that newly passes is printed (update the baseline, saying why)."""
    from vmm.scxselftests import select

    base = json.loads(BASELINE.read_text()) if BASELINE.exists() else None
    pattern = _pattern(base)
    run = _run(pattern)
    record = {"kernel": run.kernel, "filter": pattern,
              "passed": sum(r.status == "pass" for r in run.results),
              "tests": {r.name: r.status for r in run.results}}
    print(f"this run as a baseline ({BASELINE.name}):\n{json.dumps(record, indent=2)}")
    if base is None:
        pytest.fail(f"no baseline {BASELINE}: check the table above and record the JSON above "
                    "there, saying in the commit how it was got")
    if run.kernel != base["kernel"]:
        print(f"note: the baseline was recorded on {base['kernel']}, this is {run.kernel}")
    expected = {n: base["tests"][n] for n in select(list(base["tests"]), pattern)}
    got = {r.name: r.status for r in run.results}
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    passed = sorted(n for n, s in got.items() if s == "pass")
    want = sorted(n for n, s in expected.items() if s == "pass")
    regressed = [n for n in want if got[n] != "pass"]
    assert not regressed, [(n, got[n], next(r.output for r in run.results if r.name == n))
                           for n in regressed]
    assert len(passed) >= len(want), (passed, want)
    crashed = [r.name for r in run.results if r.status in ("crash", "timeout")]
    assert not crashed or set(crashed) <= {n for n, s in expected.items() if s in ("crash", "timeout")}, crashed
    new = sorted(set(passed) - set(want))
    if new:
        print(f"newly passing (update {BASELINE.name} with the reason): {new}")
