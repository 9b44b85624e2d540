"""In the SVM lane: a failing test on a real kernel (our build:7.3, KASLR on, the plain
path) carries the evidence a scheduler developer reads, as the pytest plugin gathers it:
the machine (kernel, build id, cmdline), the kernel's own sched_ext state read from guest
memory, the monitor's series and stall verdict, and the console tail, in the report's
sections, the JUnit XML properties and the saved directory that `vmm report` turns into
one page. (tests/test_report_pytest.py proves the same on our test guest, on any KVM.)

    flock /tmp/lane.lock python3 scripts/svm_lane.py run -- \\
        python3 -m pytest -q -m "slow or svm" -p no:cacheprovider tests/test_report_linux.py
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

import vmm.cli_report  # noqa: F401  (before pytester's sys.modules snapshot)
import vmm.report.html  # noqa: F401
from guest_abi import built_kernel_spec, guest_syscall_marks
from vmm.resources import cache_dir

# The lane's emulator fault, as vmm words it (the Makefile's SVM_RERUN patterns)
LANE_FAULT = r"holds the host's state|vCPU \d+: triple fault|CR3 0x[0-9a-f]+ is outside the guest's RAM"
# pytester gives the test a HOME of its own: the kernel store is found through this
CACHE = str(cache_dir())

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.slow, pytest.mark.svm, *guest_syscall_marks()]

TESTS = '''
import pytest

pytestmark = pytest.mark.vmm(kernel={kernel!r}, cpus=2, wait_for="Run /init as init process",
                             wait_timeout=600)

def test_scheduler_verdict(vmm_machine):
    with vmm_machine.monitor(interval=0.1) as mon:
        vmm_machine.wait_for_console("Run /init", timeout=5)
        import time
        time.sleep(1.0)
    assert mon.taken >= 5
    state = vmm_machine.scx.state()
    assert state.ops == "a scheduler", f"deliberate: sched_ext is {{state.state}}"
'''


def test_a_failing_linux_test_carries_the_kernels_verdicts(pytester, request, tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", CACHE)
    kernel = built_kernel_spec()
    evidence, junit = tmp_path / "evidence", tmp_path / "junit.xml"
    pytester.makepyfile(test_linux=TESTS.format(kernel=kernel))
    args = ["-p", "no:cacheprovider", "-rf", f"--vmm-evidence-dir={evidence}", f"--junitxml={junit}"]
    if not request.config.pluginmanager.hasplugin("vmm"):  # not pip-installed
        args += ["-p", "vmm.pytest_plugin"]
    result = pytester.runpytest_subprocess(*args, timeout=900)
    fault = re.search(LANE_FAULT, result.stdout.str())
    try:
        errors = result.parseoutcomes().get("errors", 0)
    except ValueError:  # no summary line: assert_outcomes below says what it saw
        errors = 0
    if errors and fault:
        # the inner run has no reruns: fail in words the lane's --only-rerun knows
        pytest.fail(f"the inner run's boot met the lane's fault ({fault.group(0)}), not a verdict")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # the sections, printed with the failure: a real kernel's, read from its memory
    result.stdout.fnmatch_lines(["*vmm machine*", "*kernel: *build*", "*vmm console (tail)*",
                                 "*vmm sched_ext*", "*disabled*", "*vmm stalls*",
                                 "*monitor 0: * samples every 0.1 s*"])
    assert "not a Linux guest" not in out
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    props = {p.get("name"): p.get("value") for p in cases["test_scheduler_verdict"].iter("property")}
    assert props["vmm.build_id"] not in ("", "none"), props
    assert props["vmm.sched_ext"].startswith("disabled") or "disabled" in props["vmm.sched_ext"], props
    assert props["vmm.stalls"] == "0"
    # the saved directory: the evidence and the monitor's series; vmm report makes a page
    saved = [p for p in evidence.iterdir() if "test_scheduler_verdict" in p.name]
    assert len(saved) == 1, list(evidence.iterdir())
    data = json.loads((saved[0] / "evidence.json").read_text())
    assert data["outcome"] == "failed" and any(saved[0].glob("monitor-*.json"))
    from vmm.cli import main
    page = tmp_path / "page.html"
    assert main(["report", str(saved[0]), "-o", str(page)]) == 0
    assert "vmm sched_ext" in page.read_text()
