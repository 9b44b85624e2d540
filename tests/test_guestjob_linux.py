"""`vmm run --exec` on a real kernel: the guest job's output streams to the host and its
exit status becomes vmm's (slow; guest user space makes system calls, so VMX/SVM or the
SVM lane: `make test-svm` runs it)."""

import subprocess
import sys
from pathlib import Path

import pytest

from guest_abi import built_kernel_spec
from vmm.kvm.pvm import is_pvm_host

pytestmark = [pytest.mark.slow, pytest.mark.kvm,
              pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm"),
              pytest.mark.skipif(is_pvm_host(), reason=(
                  "needs VMX/SVM: on a PVM host guest user space cannot make system calls "
                  "(on our machines run it in the SVM lane: make test-svm)"))]

BOOT_TIMEOUT = 300  # VMX/SVM only; the lane boots it in 10-50 s


def test_cli_exec_exit_status():
    """`vmm run --exec`: the job's output streams to stdout, its status is vmm's."""
    kernel = built_kernel_spec()
    proc = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--kernel", kernel,
                           "--timeout", str(BOOT_TIMEOUT), "--exec",
                           "echo job-says-hello; cat /proc/version; exit 7"],
                          capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60)
    assert "job-says-hello" in proc.stdout, proc.stdout[-3000:] + proc.stderr
    assert "Linux version" in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode == 7, proc.stdout[-3000:] + proc.stderr
