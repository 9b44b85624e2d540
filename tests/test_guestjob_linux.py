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


@pytest.mark.parametrize("init, words", [
    # neither ELF nor '#!': no binfmt handler takes it, as a kernel without
    # CONFIG_BINFMT_ELF would say of the job's real /init
    (b"\x01\x02 not an executable in any format\n" * 8, ["error -8", "ENOEXEC", "CONFIG_BINFMT_ELF"]),
    # a script whose interpreter is not in the initramfs
    (b"#!/nonexistent/interpreter\necho never\n", ["error -2", "ENOENT", "interpreter"]),
])
def test_cli_exec_fails_at_once_when_the_kernel_cannot_start_init(tmp_path, init, words):
    """A job whose /init the kernel cannot execute ends `vmm run --exec` with status 1 and
    the kernel's line and its cause, as soon as the kernel says so (not 255 after the
    timeout). The broken initramfs (--initrd replaces the job's) costs one boot."""
    from vmm.machine import initramfs as cpio

    image = tmp_path / "broken.cpio.gz"
    image.write_bytes(cpio.create_initramfs([
        cpio.directory("dev"), cpio.char_device("dev/console", 5, 1), cpio.file("init", init, 0o755)]))
    kernel = built_kernel_spec()
    timeout = BOOT_TIMEOUT * 2
    proc = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--kernel", kernel,
                           "--timeout", str(timeout), "--initrd", str(image), "--exec", "true"],
                          capture_output=True, text=True, timeout=timeout + 60)
    out = proc.stdout[-3000:] + proc.stderr
    assert proc.returncode == 1, out
    assert "vmm: error: the guest job never started: the kernel said 'Failed to execute /init" in proc.stderr, out
    for w in words:
        assert w in proc.stderr, out
    assert "timeout" not in proc.stderr and "vmm-job: exit" not in proc.stdout, out


RELAY_JOB = r"""
echo relay-first
printf 'relay-prompt> '
sleep 1
echo relay-after-prompt
printf '%01100d\n' 7
dmesg | grep -c 'relay-fir[s]t' | sed 's/^/relay-in-dmesg=/'
echo "relay-stdout=$(readlink /proc/$$/fd/1)"
echo relay-waits
read -r answer
echo "relay-got=$answer"
exit 3
"""


def test_job_output_goes_through_the_kernels_log_whole_lines():
    """The job's stdout is a pseudo-terminal whose lines job-init writes to /dev/kmsg
    (kernels/init/relay.h): they are in dmesg; the last line before the job waits for
    input reaches the console at once (a record without its newline would sit in the
    log unprinted); a prompt without a newline comes out after 0.2 s; a line past a
    record's 1020 bytes goes out in pieces; the exit status is still the job's."""
    from vmm import Machine

    m = Machine(kernel=built_kernel_spec(), exec=RELAY_JOB, console=None, timeout=BOOT_TIMEOUT)
    with m:
        m.wait_for_console(r"relay-waits", timeout=BOOT_TIMEOUT)
        m.feed_console(b"yes\n")
        m.wait_for_console(r"vmm-job: exit 3", timeout=60)
        text = m.console_text()
    lines = [line.rstrip("\r") for line in text.splitlines()]
    where = "\n--- console tail ---\n" + text[-3000:]
    assert "relay-first" in lines and "relay-after-prompt" in lines, where
    assert "relay-prompt> " in lines, where  # flushed alone, as a line of its own
    assert "relay-in-dmesg=1" in lines, where
    assert any(line.startswith("relay-stdout=/dev/pts/") for line in lines), where
    assert "relay-got=yes" in lines, where
    zeros = [line for line in lines if line and set(line) <= {"0", "7"} and len(line) > 50]
    assert [len(z) for z in zeros] == [1020, 80] and zeros[1].endswith("7"), where
