"""The pytest plugin: vmm_machine from markers, reuse of clean boots, console on failure."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
]

TESTS = f'''
import pytest
from vmm import KernelValue as V

pytestmark = pytest.mark.vmm(kernel={str(GUEST)!r}, cpus=2,
                             cmdline="mode=loop cpus=2", wait_for="2 cpus up")
SEEN = []

def test_reads(vmm_machine):
    SEEN.append(id(vmm_machine))
    assert vmm_machine.read("nr_cpu_ids") == 2

def test_reuses_the_clean_boot(vmm_machine):
    SEEN.append(id(vmm_machine))
    assert SEEN[0] == SEEN[1]
    vmm_machine.write("init_uts_ns", V.bytes(b"dirty\\0"), path="name.nodename")

def test_dirty_machine_is_not_reused(vmm_machine):
    assert id(vmm_machine) != SEEN[1]
    assert vmm_machine.read("init_uts_ns", "name.nodename")[:10] == b"vmm-guest\\0"

@pytest.mark.vmm(cpus=1, cmdline="mode=hello exit=0", wait_for=None)
def test_failure_attaches_console(vmm_machine):
    vmm_machine.wait(timeout=30)
    assert False, "deliberate"
'''


def test_plugin_end_to_end(pytester, request):
    pytester.makepyfile(test_guest=TESTS)
    args = ["-p", "no:cacheprovider", "-v"]
    if not request.config.pluginmanager.hasplugin("vmm"):  # not pip-installed
        args += ["-p", "vmm.pytest_plugin"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*vmm console (tail)*", "*vmm-guest: hello*"])


def test_missing_kernel_is_a_usage_error(pytester, request):
    pytester.makepyfile(test_x="def test_x(vmm_machine):\n    pass\n")
    args = ["-p", "no:cacheprovider"]
    if not request.config.pluginmanager.hasplugin("vmm"):
        args += ["-p", "vmm.pytest_plugin"]
    result = pytester.runpytest_subprocess(*args)
    result.stdout.fnmatch_lines(["*needs a kernel*--vmm-kernel*"])
