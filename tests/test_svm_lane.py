"""Tests for hosts with hardware virtualization, and the SVM lane's own identity check.

On our PVM machines these run inside the SVM lane (scripts/svm_lane.py: an L1 Linux
with kvm_amd under QEMU 10 TCG with emulated AMD SVM):

    make test-svm        # the real-kernel suite (-m "slow or svm") inside the lane

On a host with VMX/SVM they run as they are (the identity check then skips).
"""

import os
import re
import time

import pytest

from vmm.kvm.pvm import is_pvm_host
from vmm.machine.builder import DEFAULT_LINUX_CMDLINE

pytestmark = [pytest.mark.svm, pytest.mark.kvm]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(REPO, "kernels", "guests", "out", "guest.elf")
BOOT_TIMEOUT = 300  # the lane boots our build in 10-50 s


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^flags\s*:(.*)$", f.read(), re.M)
    return set(m.group(1).split()) if m else set()


def hardware_virtualization() -> bool:
    """/dev/kvm backed by VMX/SVM (not PVM, where guest user space cannot make system calls)."""
    return os.path.exists("/dev/kvm") and not is_pvm_host() and bool({"vmx", "svm"} & _cpu_flags())


def _built_kernel():
    from vmm import kernelstore as ks

    wanted = f"build-{ks.DEFAULT_BUILD_VERSION}-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
    for art in ks.list_kernels():
        if art.name == wanted:
            return art
    pytest.skip(f"kernel {wanted} is not built: run `make kernel-build` (make test-svm does)")


def test_lane_is_svm():
    """Inside the lane, /dev/kvm must be kvm_amd on an SVM CPU, and vmm must run a guest
    on it by the plain path.  `make test-svm` fails here if the lane is anything else."""
    identity = os.environ.get("VMM_SVM_LANE")
    if identity is None:
        pytest.skip("not inside the SVM lane (VMM_SVM_LANE is unset): run `make test-svm`")
    print(f"\nlane: {identity}")
    assert identity.startswith("emulated AMD SVM under QEMU"), identity
    assert os.path.exists("/dev/kvm"), "no /dev/kvm inside the lane"
    assert os.path.isdir("/sys/module/kvm_amd"), "kvm_amd is not loaded: /dev/kvm is not SVM"
    assert "svm" in _cpu_flags(), "the lane's CPU has no svm flag"
    assert not is_pvm_host(), "kvm_pvm inside the lane: vmm would take the PVM path"
    with open("/sys/module/kvm_amd/parameters/npt") as f:
        assert f.read().strip() in ("Y", "1"), "nested paging is off in the lane"

    from vmm import Machine

    with Machine(kernel=GUEST, cmdline="mode=hello exit=3") as m:
        result = m.wait(timeout=120)
    assert (result.reason, result.exit_code) == ("exit-code", 3), result


def test_guest_user_space_makes_system_calls():
    """A real kernel with our tiny check-init: init opens, reads and writes /proc files
    and mounts /proc through system calls; the host checks what it printed."""
    if not hardware_virtualization():
        pytest.skip("needs VMX/SVM: on a PVM host guest user space cannot make system calls "
                    "(on our machines run it in the SVM lane: make test-svm)")
    from vmm import Machine, kernelstore as ks
    from vmm.machine.initramfs import build_initramfs

    art = _built_kernel()
    files = ["version", "sys/kernel/osrelease", "self/status", "cpuinfo", "no-such-file"]
    # Without "nokaslr": a kernel built without KASLR does not know it and passes it on to
    # init as one more argument (check-init would then report /proc/nokaslr missing).
    base = " ".join(w for w in DEFAULT_LINUX_CMDLINE.split() if w != "nokaslr")
    cmdline = f"{base} -- {' '.join(files)}"
    m = Machine(kernel=str(art.boot_image), vmlinux=art.vmlinux, cpus=2, memory="512M",
                initrd=str(build_initramfs("check")), cmdline=cmdline)
    t0 = time.monotonic()
    m.start()
    try:
        m.wait_for_console(r"vmm-check-init: done status=\d+", timeout=BOOT_TIMEOUT)
        text = m.console_text().replace("\r\n", "\n")  # the tty turns \n into \r\n
    finally:
        m.stop()
    print(f"\ncheck-init done {time.monotonic() - t0:.1f} s after the VM started")
    assert "vmm-check-init: start" in text
    release = re.search(r"== /proc/sys/kernel/osrelease\n(\S+)", text)
    assert release and release.group(1).startswith(ks.DEFAULT_BUILD_VERSION), text[-2000:]
    assert f"== /proc/version\nLinux version {release.group(1)} " in text
    # /proc/self is init itself: pid 1, named after the file the kernel ran.
    assert re.search(r"== /proc/self/status\nName:\tinit\n", text), text[-2000:]
    assert re.search(r"\nPid:\t1\n", text)
    assert len(re.findall(r"^processor\s*: \d+$", text, re.M)) == 2
    # A failed open() comes back as a failure, not a crash: one file missing, status 1.
    assert "vmm-check-init: cannot open /proc/no-such-file" in text
    assert "vmm-check-init: done status=1" in text
