"""clone=True in the vmm marker: one boot and snapshot per set of options, a
copy-on-write clone per test, each free to write its guest, stopped after its test."""

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
import time
import pytest
from vmm import KernelTarget as T, KernelValue as V

pytestmark = pytest.mark.vmm(kernel={str(GUEST)!r}, cpus=2, cmdline="mode=loop cpus=2",
                             wait_for="2 cpus up", clone=True)
SEEN = []
NODENAME = T.field("init_uts_ns", "name.nodename")

def counter(m):
    return m.read("runqueues", "counter", cpu=1, hot=True)

@pytest.mark.parametrize("name", [b"first", b"second", b"third"])
def test_each_gets_its_own_clone(vmm_machine, name):
    assert "2 cpus up" not in vmm_machine.console_text()  # a clone: the template saw the marker
    assert vmm_machine.read(NODENAME)[:6] != b"first\\0"   # no earlier test's write is seen
    assert all(m is not vmm_machine for m in SEEN)
    SEEN.append(vmm_machine)
    vmm_machine.write(NODENAME, V.bytes(name + b"\\0"))
    c = counter(vmm_machine)
    deadline = time.monotonic() + 30
    while counter(vmm_machine) == c and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter(vmm_machine) != c  # the clone runs
    assert all(not m.running for m in SEEN[:-1])  # earlier clones were stopped
'''


def test_clones_per_test(pytester, request):
    pytester.makepyfile(test_clones=TESTS)
    args = ["-p", "no:cacheprovider", "-rf", "-v"]
    if not request.config.pluginmanager.hasplugin("vmm"):  # not pip-installed
        args += ["-p", "vmm.pytest_plugin"]
    result = pytester.runpytest_subprocess(*args, timeout=600)
    result.assert_outcomes(passed=3)
