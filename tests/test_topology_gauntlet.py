"""The vmm_gauntlet marker: one test, one variant per topology preset, named by it, run
in parallel by pytest-xdist (real KVM, our test guest: its BSP runs, the other vCPUs
wait for INIT/SIPI, so a 16-vCPU preset builds as fast as a 1-vCPU one)."""

import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests")]

PRESETS = ["uni", "quad-smt", "numa2", "numa4-llc8"]

TESTS = f'''
import pytest
from vmm import topology

@pytest.mark.vmm(kernel={str(GUEST)!r}, cmdline="mode=loop cpus=1", wait_for="1 cpus up")
@pytest.mark.vmm_gauntlet(presets={PRESETS!r}, budget_s=60)
def test_each_preset(vmm_machine, vmm_preset):
    want = topology.parse(vmm_preset)
    assert vmm_machine.cpus == want.cpus
    assert vmm_machine.topology.spec == want.spec
    assert 0 < vmm_machine.timeout <= 60  # what is left of the gauntlet's budget
'''


def _args(request, monkeypatch, *args):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the subprocess imports this checkout's vmm
    if not request.config.pluginmanager.hasplugin("vmm"):  # not pip-installed
        args += ("-p", "vmm.pytest_plugin")
    return ("-p", "no:cacheprovider") + args


@pytest.mark.slow  # two pytest workers start and import vmm: ~30-100 s on a busy 2-core host
def test_gauntlet_names_each_variant_by_its_preset(pytester, request, monkeypatch):
    """Spread over execnet workers the way several hosts would take them (`--tx
    ssh=host//python=python3` per host; here two `popen` gateways on this machine: the
    same protocol, no sshd needed)."""
    pytest.importorskip("xdist", reason="needs pytest-xdist (pip install pytest-xdist)")
    pytester.makepyfile(TESTS)
    tx = f"popen//python={sys.executable}"
    result = pytester.runpytest_subprocess(*_args(request, monkeypatch, "-d", "--tx", tx, "--tx", tx, "-v"))
    result.assert_outcomes(passed=len(PRESETS))
    passed = [line for line in result.stdout.lines if "PASSED" in line]
    for name in PRESETS:
        assert any(f"test_each_preset[{name}]" in line for line in passed), result.stdout.str()


def test_gauntlet_refuses_an_unknown_preset(pytester, request, monkeypatch):
    pytester.makepyfile('''
import pytest
@pytest.mark.vmm_gauntlet(presets=["no-such"])
def test_x(vmm_preset):
    pass
''')
    result = pytester.runpytest_subprocess(*_args(request, monkeypatch))
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown presets ?'no-such'?*"])


def test_the_budget_bounds_the_whole_gauntlet(pytester, request, monkeypatch):
    """budget_s counts from the first variant's start: a variant that would start with
    none left fails saying so; the ones before got what was left as their VM timeout."""
    pytester.makepyfile(f'''
import time
import pytest

@pytest.mark.vmm(kernel={str(GUEST)!r}, cmdline="mode=loop cpus=1", wait_for="1 cpus up")
@pytest.mark.vmm_gauntlet(presets=["uni", "numa2"], budget_s=4)
def test_slow(vmm_machine, vmm_preset):
    assert vmm_machine.timeout <= 4
    time.sleep(4.5)
''')
    result = pytester.runpytest_subprocess(*_args(request, monkeypatch, "-v"))
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*budget of 4 s was spent before variant 'numa2' started*"])
