"""Shared by the tests that boot our test guests: their report-port record format
(kernels/guests/README.md) and the "is KVM usable / are the guests built" checks."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUEST_DIR = REPO / "kernels" / "guests"
REC_MAGIC = 0xA5000000


def records(reports):
    """(vcpu, type, payload) for every record, from the per-vCPU report streams.

    Each record is a header word ``0xa5000000 | type << 8 | len`` and ``len`` words."""
    streams, out = {}, []
    for vcpu, word in reports:
        streams.setdefault(vcpu, []).append(word)
    for vcpu, words in streams.items():
        i = 0
        while i < len(words):
            header = words[i]
            assert header & 0xFF000000 == REC_MAGIC, hex(header)
            length = header & 0xFF
            out.append((vcpu, (header >> 8) & 0xFF, words[i + 1:i + 1 + length]))
            i += 1 + length
    return out


def kvm_problem():
    """None when /dev/kvm can be opened, else why not (a missing facility: skip).

    Any other failure (a broken KVM, a missing capability) is raised, so that the
    tests fail instead of hiding it behind a skip."""
    from vmm.errors import KvmPermissionError, KvmUnavailable
    from vmm.kvm import Kvm

    try:
        Kvm().close()
        return None
    except (KvmUnavailable, KvmPermissionError) as e:
        return str(e)


def require_guests(*paths):
    """Skip unless KVM works; build the guests when they are missing."""
    why = kvm_problem()
    if why:
        pytest.skip(f"KVM not usable: {why}")
    if not all(Path(p).exists() for p in paths):
        try:
            subprocess.run(["make", "-C", str(GUEST_DIR)], check=True, capture_output=True,
                           timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"test guests not built and `make -C kernels/guests` failed: {e}")
    if not all(Path(p).exists() for p in paths):
        pytest.skip("test guests not built (make -C kernels/guests)")


def built_kernel_spec(flavour=None):
    """The store spec of our sched_ext build for the current fragment ("build:7.3", or
    "build:7.3+scx" for that flavour); skips, saying what to run, when it is not built."""
    from vmm import kernelstore as ks

    fragment = ks.FLAVOURS[flavour] if flavour else ks.DEFAULT_FRAGMENT
    wanted = f"build-{ks.DEFAULT_BUILD_VERSION}-{ks.fragment_hash(fragment)}"
    spec = f"build:{ks.DEFAULT_BUILD_VERSION}" + (f"+{flavour}" if flavour else "")
    if not any(art.name == wanted for art in ks.list_kernels()):
        how = "make kernel-build" if not flavour else "make svm-setup"
        pytest.skip(f"kernel {wanted} ({spec}) is not built: run `{how}` (CI does)")
    return spec


def guest_syscall_marks():
    """The marks of a test whose guest user space makes system calls: /dev/kvm with
    VMX/SVM (on our PVM machines: the SVM lane)."""
    from vmm.kvm.pvm import is_pvm_host

    return [pytest.mark.kvm,
            pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm"),
            pytest.mark.skipif(is_pvm_host(), reason=(
                "guest user space cannot make system calls on a PVM host: run on VMX/SVM or "
                "in the SVM lane (scripts/svm_lane.py run -- python3 -m pytest ...)"))]


# A guest job's start (busybox sh): attach scx_simple, wait for sched_ext to say
# "enabled" (exit 3 after 60 s), print the state, then keep every CPU busy ($BUSY: the
# spinners' pids).
SCX_ATTACH_AND_BUSY = r"""
scx_simple > /tmp/scx.log 2>&1 &
SCX=$!
i=0
until [ "$(cat /sys/kernel/sched_ext/state)" = enabled ]; do
  i=$((i+1))
  if [ $i -gt 600 ]; then echo "vmm-test: scx_simple did not attach"; cat /tmp/scx.log; exit 3; fi
  sleep 0.1
done
echo "vmm-test: attached state=$(cat /sys/kernel/sched_ext/state) ops=$(cat /sys/kernel/sched_ext/root/ops)"
N=$(grep -c ^processor /proc/cpuinfo)
BUSY=
for c in $(seq $N); do (while :; do :; done) & BUSY="$BUSY $!"; done
"""


def scx_simple_machine(job, cpus):
    """An unstarted vmm.Machine on our build:7.3+scx kernel whose guest job (``job``)
    finds scx_simple (built for that kernel, vmm.scxbuild, cached) at /bin/scx_simple.
    Skips, saying what to run or install, when the kernel or the toolchain is missing."""
    from vmm import Machine
    from vmm.scxbuild import ScxBuildError, build_scheduler

    kernel = built_kernel_spec("scx")
    try:
        sched = build_scheduler("simple", kernel, progress=None)
    except ScxBuildError as exc:
        if "apt-get install" in str(exc):  # the toolchain is missing: the message names it
            pytest.skip(str(exc))
        raise
    return Machine(kernel=kernel, cpus=cpus, memory="512M", console=None, exec=job,
                   include=[f"{sched.binary}:/bin/scx_simple"])


def gdb_batch(cmds, timeout):
    """Runs `gdb -batch -nx -ex CMD...`; its stdout and stderr together. gdb is a foreign
    program: it gets no sanitizer runtime (make test-asan preloads libasan for our C
    core only)."""
    args = ["gdb", "-batch", "-nx"] + [a for c in cmds for a in ("-ex", c)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    return out.stdout + out.stderr
