"""The pytest plugin reuses a machine only when it is truly the same one: same options,
same boot marker reached, same kernel file, and nothing written to the guest."""

import os
from pathlib import Path

import pytest

from vmm.pytest_plugin import _pool_key

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"
needs_guest = [
    pytest.mark.kvm,
    pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
]


def test_key_covers_the_marker_and_the_kernel_file(tmp_path):
    k = tmp_path / "bzImage"
    k.write_bytes(b"one")
    opts = {"kernel": str(k), "cpus": 2}
    assert _pool_key(opts, None) != _pool_key(opts, "2 cpus up")
    assert _pool_key(opts, "x") == _pool_key(dict(opts), "x")
    before = _pool_key(opts, None)
    k.write_bytes(b"rebuilt")
    os.utime(k, ns=(1, 1))
    assert _pool_key(opts, None) != before


TESTS = f'''
import pytest
from vmm import KernelValue as V

pytestmark = pytest.mark.vmm(kernel={str(GUEST)!r}, cpus=2, cmdline="mode=loop cpus=2")
SEEN = []

def test_a_no_marker(vmm_machine):
    SEEN.append(vmm_machine)

@pytest.mark.vmm(wait_for="2 cpus up")
def test_b_marker_is_waited_for(vmm_machine):
    assert vmm_machine is not SEEN[0]
    assert "2 cpus up" in vmm_machine.console_text()
    SEEN.append(vmm_machine)

@pytest.mark.vmm(wait_for="2 cpus up")
def test_c_reuses_and_writes_raw_memory(vmm_machine):
    assert vmm_machine is SEEN[1]
    gpa = vmm_machine.memory.regions[0][0] + 0x1000
    vmm_machine.memory.write_u32(gpa, vmm_machine.memory.read_u32(gpa))

@pytest.mark.vmm(wait_for="2 cpus up")
def test_d_raw_write_was_not_reused(vmm_machine):
    assert vmm_machine is not SEEN[1]
    SEEN.append(vmm_machine)
    vmm_machine.feed_console(b"x")

@pytest.mark.vmm(wait_for="2 cpus up")
def test_e_console_input_was_not_reused(vmm_machine):
    assert vmm_machine is not SEEN[2]
'''


@pytest.mark.parametrize("mark", [needs_guest])
def test_reuse_only_what_is_the_same(mark, pytester, request, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this tree's vmm in the subprocess
    pytester.makepyfile(test_guest=TESTS)
    args = ["-p", "no:cacheprovider", "-v"]
    if not request.config.pluginmanager.hasplugin("vmm"):  # not pip-installed
        args += ["-p", "vmm.pytest_plugin"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=5)
