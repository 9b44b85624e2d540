"""The pytest plugin's evidence on a real machine (our tiny test guest, under KVM): a
failing test's report carries the sections, the JUnit XML the vmm.* properties, the
terminal summary a `vmm evidence` entry, and its saved directory becomes one page."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import vmm.cli_report  # noqa: F401
import vmm.report.html  # noqa: F401
from vmm.cli import main

try:  # imported before pytester's sys.modules snapshot, which drops what a test imports first
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
except ImportError:
    pass

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
]

TESTS = f'''
import time
import pytest
from vmm import KernelValue as V

pytestmark = pytest.mark.vmm(kernel={str(GUEST)!r}, cpus=2, cmdline="mode=loop cpus=2",
                             wait_for="2 cpus up")

def test_stalls(vmm_machine):
    with vmm_machine.monitor(interval=0.05) as mon:
        vmm_machine.write("runqueues", V.u32(2), path="nr_running", cpu=1)
        time.sleep(1.5)
    assert False, "deliberate: cpu 1 looks stalled"

def test_passes(vmm_machine):
    assert vmm_machine.read("nr_cpu_ids") == 2
'''


def run(pytester, request, *extra):
    pytester.makepyfile(test_guest=TESTS)
    args = ["-p", "no:cacheprovider", "-rf", *extra]
    if not request.config.pluginmanager.hasplugin("vmm"):  # not pip-installed
        args += ["-p", "vmm.pytest_plugin"]
    return pytester.runpytest_subprocess(*args)


def test_a_failing_test_carries_its_evidence(pytester, request, tmp_path):
    evidence, junit, html = tmp_path / "evidence", tmp_path / "junit.xml", tmp_path / "report.html"
    try:
        import pytest_html  # noqa: F401
        with_html = [f"--html={html}", "--self-contained-html"]
    except ImportError:  # pytest-html is optional: its part is checked where it is installed
        with_html = []
    result = run(pytester, request, f"--vmm-evidence-dir={evidence}", f"--junitxml={junit}", *with_html)
    result.assert_outcomes(passed=1, failed=1)
    # report sections, printed with the failure
    result.stdout.fnmatch_lines(["*vmm machine*", "*kernel: *guest.elf*", "*cmdline: *mode=loop*",
                                 "*vmm exit*", "*vmm console (tail)*", "*vmm sched_ext*",
                                 "*not a Linux guest*", "*vmm stalls*", "*monitor 0: * samples every 0.05 s*"])
    # the terminal summary's entry, and only for the failed test
    result.stdout.fnmatch_lines(["*= vmm evidence =*", "*test_stalls: failed*",
                                 f"*evidence: {evidence}*test_stalls*(vmm report *)*"])
    assert "test_passes: passed" not in result.stdout.str()
    # JUnit XML properties on the failed testcase
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    props = {p.get("name"): p.get("value") for p in cases["test_stalls"].iter("property")}
    assert props["vmm.kernel"].endswith("guest.elf") and "mode=loop" in props["vmm.cmdline"]
    assert props["vmm.exit"] == "running" and props["vmm.evidence"].startswith(str(evidence))
    assert "vmm.plot" in props and props["vmm.sched_ext"].startswith("not read")
    assert not list(cases["test_passes"].iter("property"))
    if with_html:  # pytest-html shows the sections and the plot (an extra)
        page = html.read_text()
        assert "vmm stalls" in page and "not a Linux guest" in page and "image/png;base64" in page and "plot-0.png" in page
    # the saved directory, as one page with the monitor's figure
    (d,) = list(evidence.iterdir())
    assert {p.name for p in d.iterdir()} == {"evidence.json", "monitor-0.json", "plot-0.png"}
    assert main(["report", str(d)]) == 0
    page = (d / "report.html").read_text()
    assert page.count("<svg") == 1 and "vmm console (tail)" in page and "vmm-guest" in page


def test_always_gives_evidence_of_passing_tests_too(pytester, request, tmp_path):
    evidence = tmp_path / "evidence"
    result = run(pytester, request, "--vmm-evidence=always", f"--vmm-evidence-dir={evidence}",
                 "-k", "passes")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*= vmm evidence =*", "*test_passes: passed*"])
    assert len(list(evidence.iterdir())) == 1
    never = run(pytester, request, "--vmm-evidence=never", "-k", "stalls")
    never.assert_outcomes(failed=1)
    never.stdout.fnmatch_lines(["*vmm console (tail)*"])
    assert "vmm evidence" not in never.stdout.str() and "vmm stalls" not in never.stdout.str()


def test_vmm_run_plots_its_monitor(tmp_path, capsys):
    out = tmp_path / "run.svg"
    status = main(["run", "--kernel", str(GUEST), "--cpus", "2", "--cmdline", "mode=loop cpus=2",
                   "--timeout", "2", "--monitor", "0.05", "--plot", str(out), "--quiet"])
    assert status == 255  # the timeout ends the run
    assert f"vmm: monitor plot: {out}" in capsys.readouterr().err
    root = ET.parse(out).getroot()
    assert [e.get("id") for e in root.iter()].count("cpu 1") == 3  # nr_running, scx, clock rows


def test_vmm_run_plot_needs_a_monitor_and_a_format(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--kernel", str(GUEST), "--plot", "x.png"])
    assert "--plot needs --monitor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--kernel", str(GUEST), "--monitor", "0.1", "--plot", "x.jpg"])
    assert "say .png, .svg or .html" in capsys.readouterr().err


def test_collect_from_a_machine_without_a_monitor(tmp_path):
    from vmm import Machine
    from vmm.report.evidence import collect

    with Machine(kernel=str(GUEST), cpus=2, cmdline="mode=loop cpus=2") as m:
        m.wait_for_console("2 cpus up", timeout=60)
        m.core_path = str(tmp_path / "vmcore")  # as a panic with dump_on_panic leaves it
        ev = collect(m, "t", "failed")
        m.dump_core(tmp_path / "taken")  # one the test took itself is named too
        taken = collect(m, "t", "failed")
    assert taken.section("vmm vmcore").splitlines()[:2] == [str(tmp_path / "vmcore"),
                                                             str(tmp_path / "taken")]
    assert dict(taken.properties)["vmm.vmcore"] == str(tmp_path / "taken")
    assert "cpus: 2, topology" in ev.section("vmm machine") and "vmm: " in ev.section("vmm machine")
    assert "2 cpus up" in ev.section("vmm console (tail)")
    assert ev.section("vmm stalls").startswith("no monitor ran")
    assert ev.section("vmm vmcore").startswith(str(tmp_path / "vmcore"))
    assert dict(ev.properties)["vmm.vmcore"] == str(tmp_path / "vmcore")
    assert ev.section("vmm sched_ext dump") is None and ev.monitors == []
