"""Every scheduler of the kernel's own tree (tools/sched_ext: simple, cpu0, qmap, central,
flatcg, userland, pair, sdt in Linux 7.3) attached under load and detached cleanly, each
read from the host as well as from the guest.

One boot of build:7.3+scx with 2 vCPUs and every scheduler's binary (`vmm scx build --all
--kernel build:7.3+scx`, on the host first: the lane has no network and compiles slowly);
the guest job keeps 4 busy loops running and, for each scheduler the host names on the
console, starts it, waits for /sys/kernel/sched_ext/state to say enabled, and on the next
command stops it with SIGINT (each scheduler's own clean-exit path). The host checks,
from guest memory, that the scheduler is attached and enabled while the guest says so,
and that it detached with the kernel's "unregistered from user space" exit.

Guest user space makes system calls: VMX/SVM or the SVM lane (make test-svm runs it).
"""

import pytest

from guest_abi import built_kernel_spec, guest_syscall_marks

pytestmark = [pytest.mark.slow, pytest.mark.svm, *guest_syscall_marks()]

CPUS = 2
BOOT_TIMEOUT = 900
ATTACH_TIMEOUT = 240  # an arena scheduler's BPF verification is slow under nested TCG

JOB = r"""
# libbpf reads the kernel's config for __kconfig externs (scx_central's): our builds
# have no /proc/config.gz, so the host put it in /etc/vmm-kconfig
mkdir -p /boot; read rel _ </proc/sys/kernel/osrelease; cat /etc/vmm-kconfig > /boot/config-$rel
for i in 1 2 3 4; do (while :; do :; done) & done
echo "vmm-tree: ready"
while read -r cmd name; do
  case "$cmd" in
    start)
      scx_$name > /tmp/$name.log 2>&1 &
      pid=$!; echo $pid > /tmp/sched.pid
      n=0
      until [ "$(cat /sys/kernel/sched_ext/state)" = enabled ] || ! kill -0 $pid 2>/dev/null || [ $n -ge 2400 ]; do
        sleep 0.1; n=$((n+1))
      done
      if kill -0 $pid 2>/dev/null && [ "$(cat /sys/kernel/sched_ext/state)" = enabled ]; then
        echo "vmm-tree: $name attached ops=$(cat /sys/kernel/sched_ext/root/ops) state=$(cat /sys/kernel/sched_ext/state)"
      else
        tail -n 20 /tmp/$name.log | sed "s/^/vmm-tree: log /"
        echo "vmm-tree: $name failed"
      fi;;
    stop)
      pid=$(cat /tmp/sched.pid); kill -INT $pid 2>/dev/null; wait $pid; rc=$?
      n=0
      until [ "$(cat /sys/kernel/sched_ext/state)" = "disabled" ] || [ $n -ge 600 ]; do sleep 0.1; n=$((n+1)); done
      echo "vmm-tree: $name detached rc=$rc state=$(cat /sys/kernel/sched_ext/state)";;
    quit) break;;
  esac
done
exit 0
"""


def _schedulers():
    try:
        from vmm.scxbuild import tree_schedulers

        return tree_schedulers(built_kernel_spec("scx"))
    except Exception:  # not built here: the fixture's skip says what to run
        return ["simple"]


@pytest.fixture(scope="module")
def tree_guest():
    from vmm import Machine, kernelstore
    from vmm.scxbuild import build_all

    kernel = built_kernel_spec("scx")
    config = kernelstore.resolve_kernel(kernel).config
    built, failed = build_all(kernel, progress=None)
    assert not failed, {n: str(e).splitlines()[0] for n, e in failed.items()}
    m = Machine(kernel=kernel, cpus=CPUS, memory="512M", console=None, exec=JOB,
                include=[f"{s.binary}:/bin/scx_{s.name}" for s in built] + [f"{config}:/etc/vmm-kconfig"])
    m.start()
    try:
        m.wait_for_console("vmm-tree: ready", timeout=BOOT_TIMEOUT)
        yield m
    finally:
        m.stop()


def _ask(m, line, answer, timeout):
    start = m.console_position()
    m.feed_console(line.encode() + b"\n")
    return m.wait_for_console(answer, timeout=timeout, start=start)


@pytest.mark.parametrize("name", _schedulers())
def test_tree_scheduler_attaches_under_load_and_detaches(tree_guest, name):
    m = tree_guest
    said = _ask(m, f"start {name}", rf"vmm-tree: {name} (?:attached ops=(\S+) state=(\w+)|failed)\r?\n",
                ATTACH_TIMEOUT)
    try:
        if said.group(1) is None:
            log = [line for line in m.console_text().splitlines() if "vmm-tree: log" in line]
            pytest.fail(f"scx_{name} did not attach:\n" + "\n".join(log[-20:]))
        ops, state = said.group(1), said.group(2)
        assert state == "enabled", said.group(0)
        s = m.scx.state()  # from guest memory
        print(f"scx_{name}: guest says ops={ops}; host reads {s.describe()}")
        assert (s.state, s.ops, s.exit_kind) == ("enabled", ops, None), s
    finally:  # the next scheduler must find none attached, whatever happened here
        stopped = _ask(m, f"stop {name}", rf"vmm-tree: {name} detached rc=(\d+) state=(\w+)\r?\n", 120)
    assert stopped.group(2) == "disabled", stopped.group(0)
    after = m.scx.state()
    assert after.state == "disabled" and after.ops is None, after
    assert f'sched_ext: BPF scheduler "{ops}" disabled (unregistered from user space)' \
        in m.console_text(), m.console_tail(20)
