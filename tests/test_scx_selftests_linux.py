"""The kernel's own sched_ext selftests (tools/testing/selftests/sched_ext) in a guest:
`vmm scx selftests` on our build:7.3+scx kernel, its pass count checked against the
baseline recorded for that kernel (tests/data/scx_selftests_baseline.json).

Guest user space makes system calls: VMX/SVM, or the SVM lane (make test-svm).  The
runner is built on the host first (clang; make svm-setup does it): the lane has no
network and builds slowly.  Set VMM_SELFTESTS_CONSOLE=1 to print each boot's console
(how the recorded output of tests/test_scx_selftests.py was got).
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


def test_selftests_pass_count_against_the_baseline():
    """Every test the baseline says passes on our kernel passes, and none crashes the
    guest; a test that newly passes is printed (update the baseline, saying why)."""
    base = json.loads(BASELINE.read_text()) if BASELINE.exists() else None
    run = _run(base.get("filter") if base else None)
    record = {"kernel": run.kernel, "filter": base.get("filter") if base else None,
              "passed": sum(r.status == "pass" for r in run.results),
              "tests": {r.name: r.status for r in run.results}}
    print(f"this run as a baseline ({BASELINE.name}):\n{json.dumps(record, indent=2)}")
    if base is None:
        pytest.fail(f"no baseline {BASELINE}: check the table above and record the JSON above "
                    "there, saying in the commit how it was got")
    got = {r.name: r.status for r in run.results}
    assert set(got) == set(base["tests"]), (sorted(got), sorted(base["tests"]))
    passed = sorted(n for n, s in got.items() if s == "pass")
    want = sorted(n for n, s in base["tests"].items() if s == "pass")
    regressed = [n for n in want if got[n] != "pass"]
    assert not regressed, [(n, got[n], next(r.output for r in run.results if r.name == n))
                           for n in regressed]
    assert len(passed) >= base["passed"], (passed, base["passed"])
    crashed = [r.name for r in run.results if r.status in ("crash", "timeout")]
    assert not crashed or set(crashed) <= {n for n, s in base["tests"].items() if s in ("crash", "timeout")}, crashed
    new = sorted(set(passed) - set(want))
    if new:
        print(f"newly passing (update {BASELINE.name} with the reason): {new}")
