"""Requests from the guest on a real kernel: a program in the guest asks the host, at a
point of its own choosing, for the scx clock/flag batch on its own CPU, and checks what
it reads right after; malformed, unknown and oversized requests get error replies while
the guest goes on.

One boot of Linux 7.3 "build:7.3+scx" with scx_simple attached (as tests/test_scx_linux.py);
the guest job drives everything with /bin/vmm-request (kernels/init/vmm-request.c, in
every guest job) over COM2 = /dev/ttyS1; the host only registers its handler before the
start. Guest user space must make system calls, so this runs with VMX/SVM, or here in
the SVM lane:

    python3 scripts/svm_lane.py run --cwd . -- \\
        python3 -m pytest -q -m slow -p no:cacheprovider tests/test_requests_linux.py -rA

What the guest can see of the injection, and what it cannot: sched_ext's SysRq-D dump
(the sched_ext_dump trace event, read from tracefs) prints each busy CPU's
rq->scx.flags under its rq lock, but not rq->scx.clock (only a BPF scheduler reads it,
through scx_bpf_now()). SCX_RQ_CLK_VALID, ORed in by the host while the guest was
frozen, lasts only until that CPU's next rq unlock (rq_unpin_lock() ->
scx_rq_clock_invalidate(), see tests/test_scx_linux.py test 3): the reply itself wakes
the requester on its CPU, which takes and drops that rq's lock, so by the time the
guest's dump runs the kernel has normally cleared the flag again, as it would on real
hardware. The guest therefore checks that the reply names its own CPU and that its
dump shows that CPU online on the ext class; the host checks the flags it wrote and
read back inside the same freeze (the reply carries them) and prints whether the
guest's dump still showed CLK_VALID.
"""

import re
from pathlib import Path

import pytest

from guest_abi import (SCX_ATTACH_AND_BUSY, built_kernel_spec, guest_syscall_marks,
                       scx_simple_machine)

pytestmark = [pytest.mark.slow, *guest_syscall_marks()]

CPUS = 2
BOOT_TIMEOUT = 900
REQUESTER_CPU = 1

# The guest job: attach scx_simple, keep every CPU busy, then ask the host for the scx
# clock/flag batch on CPU 1 from CPU 1, dump sched_ext's state right after, send a
# malformed, an unknown and an oversized request, ask once more, and detach. Exit 42:
# every step went as expected (each check prints a "vmm-test:" line the host reads).
JOB = SCX_ATTACH_AND_BUSY + r"""
# The dump is read from tracefs, not the console.
T=/sys/kernel/tracing
[ -e $T/trace ] || mount -t tracefs nodev $T
echo 1 > $T/events/sched_ext/sched_ext_dump/enable
fail=0

R=$(vmm-request -c 1 scx-clock 2>&1); rc=$?
echo "vmm-test: scx-clock rc=$rc reply=$R"
# right after the reply: the guest's own view of every busy CPU's rq
echo > $T/trace
echo D > /proc/sysrq-trigger
grep -E 'CPU [0-9]+ *: nr_run=|curr=.* class=' $T/trace
echo "vmm-test: dumped"
case "$R" in *"cpu=1 "*) ;; *) echo "vmm-test: the reply does not name cpu 1"; fail=1;; esac
[ $rc -eq 0 ] || fail=1
grep -qE 'CPU 1 *: nr_run=' $T/trace || { echo "vmm-test: no CPU 1 line in the dump"; fail=1; }

vmm-request -r "$(printf 'x\001y')" 2>&1; rc=$?
echo "vmm-test: malformed rc=$rc"; [ $rc -eq 1 ] || fail=1
vmm-request no-such-request a b 2>&1; rc=$?
echo "vmm-test: unknown rc=$rc"; [ $rc -eq 1 ] || fail=1
vmm-request -r "77 $(printf '%5000s' '' | tr ' ' z)" 2>&1; rc=$?
echo "vmm-test: oversized rc=$rc"; [ $rc -eq 1 ] || fail=1

R=$(vmm-request -c 0 scx-clock 2>&1); rc=$?
echo "vmm-test: again rc=$rc reply=$R"; [ $rc -eq 0 ] || fail=1

kill $BUSY
kill -INT $SCX
wait $SCX
echo "vmm-test: done fail=$fail scx_simple_rc=$?"
if [ $fail -eq 0 ]; then exit 42; else exit 4; fi
"""


def scx_clock(ctx, request):
    """The host's handler: the scx clock/flag batch on the requester's CPU only, inside
    the request's freeze, and what it wrote and read back."""
    cpu = request.int_arg("cpu")
    inj = ctx.inject_scx_clock(cpus=[cpu])
    row = inj.rows[0]
    return (f"cpu={row.cpu} clock={inj.clock} flags={row.flags_before:#x}->{row.flags_after:#x} "
            f"ok={int(inj.ok)}")


@pytest.fixture(scope="module")
def guest():
    m = scx_simple_machine(JOB, CPUS)
    m.on_request("scx-clock", scx_clock)
    m.start()
    try:
        m.wait_for_console(r"vmm-test: done", timeout=BOOT_TIMEOUT)
        yield m
    finally:
        m.stop()


def test_1_guest_asks_for_the_scx_batch_on_its_own_cpu(guest):
    text = guest.console_text()
    assert re.search(r"vmm-test: attached state=enabled ops=simple\b", text), text[-3000:]
    m = re.search(r"vmm-test: scx-clock rc=(\d+) reply=cpu=(\d+) clock=(\d+) "
                  r"flags=0x([0-9a-f]+)->0x([0-9a-f]+) ok=(\d)", text)
    assert m, text[-3000:]
    rc, cpu, clock, before, after, ok = m.groups()
    mask = guest.kernel_image.enum("SCX_RQ_CLK_VALID") & 0xFFFFFFFF
    online = guest.kernel_image.enum("SCX_RQ_ONLINE") & 0xFFFFFFFF
    assert (rc, int(cpu), ok) == ("0", REQUESTER_CPU, "1")
    assert int(after, 16) == int(before, 16) | mask and int(clock) > 0
    # the host served it: one request line, its reply, on the worker's record
    served = [(line, reply) for line, reply in guest.requests.history if " scx-clock " in line]
    assert served[0][0].split()[1:] == ["scx-clock", f"cpu={REQUESTER_CPU}"], served
    # the guest's dump, right after the reply
    dump = text[m.end():text.index("vmm-test: dumped", m.end())]
    rows = {int(c): int(f, 16) for c, f in re.findall(r"CPU (\d+)\s*: nr_run=\d+ flags=0x([0-9a-f]+)", dump)}
    assert REQUESTER_CPU in rows, dump[-3000:]
    assert rows[REQUESTER_CPU] & online, f"cpu {REQUESTER_CPU}: flags {rows[REQUESTER_CPU]:#x}"
    assert dump.count("class=ext_sched_class") >= 1, dump[-3000:]
    print(f"host wrote on cpu {cpu}: flags {before}->{after} clock {clock}; the guest's dump right "
          f"after: flags {rows[REQUESTER_CPU]:#x}, SCX_RQ_CLK_VALID "
          f"{'still set' if rows[REQUESTER_CPU] & mask else 'cleared by the kernel since the thaw'}")


def test_2_bad_requests_get_error_replies_and_the_guest_goes_on(guest):
    text = guest.console_text()
    assert "vmm-test: malformed rc=1" in text, text[-3000:]
    assert re.search(r"error: malformed request: byte 0x01 at column 2", text), text[-3000:]
    assert "vmm-test: unknown rc=1" in text
    assert re.search(r"error: unknown request 'no-such-request'; the host serves: scx-clock", text)
    assert "vmm-test: oversized rc=1" in text
    assert re.search(r"error: request too long: 5004 bytes, at most 4096", text), text[-3000:]
    m = re.search(r"vmm-test: again rc=0 reply=cpu=0 clock=\d+ flags=0x[0-9a-f]+->0x[0-9a-f]+ ok=1",
                  text)
    assert m, text[-3000:]
    replies = [reply for _, reply in guest.requests.history]
    assert len(replies) == 5 and sum(r.split()[1] == b"error" for r in replies) == 3, replies
    assert guest.requests.dropped == 0


def test_3_job_status_reaches_the_host(guest):
    status = guest.wait_job(timeout=300)
    text = guest.console_text()
    assert re.search(r"vmm-test: done fail=0", text), text[-3000:]
    assert status == 42, text[-3000:]


def test_4_vmm_run_serve_scx_clock_from_the_shell():
    """The same from the command line: `vmm run --serve-scx-clock --exec` on the plain
    sched_ext build (no scheduler attached: the batch needs only the kernel's BTF)."""
    import subprocess
    import sys

    kernel = built_kernel_spec()
    job = "vmm-request -c 1 scx-clock && vmm-request -t 5 nope; echo rc=$?; exit 9"
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--kernel", kernel, "--cpus", "2",
                        "--serve-scx-clock", "--exec", job], capture_output=True, text=True,
                       timeout=BOOT_TIMEOUT, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 9, r.stdout[-3000:] + r.stderr
    assert re.search(r"^cpus=1 clock=\d+ flags=0x[0-9a-f]+->0x[0-9a-f]+ ok=1\r?$", r.stdout, re.M), \
        r.stdout[-3000:]
    assert "error: unknown request 'nope'; the host serves: scx-clock" in r.stdout, r.stdout[-3000:]
    assert re.search(r"^rc=1\r?$", r.stdout, re.M), r.stdout[-3000:]
