"""Requests from the guest (vmm/runtime/requests.py, docs/requests.md): the line protocol,
the guest's client (kernels/init/vmm-request.c, run here on the host against a pty), and
the host side on a real Machine (our test guest; COM2 driven from the test, as a vCPU
thread would deliver the guest's bytes)."""

import os
import pty
import re
import select
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vmm import KernelTarget as T, KernelValue as V, Machine
from vmm.errors import GuestRequestError
from vmm.machine import layout as L
from vmm.runtime.requests import (MAX_LINE, LineAssembler, Oversized, RequestChannel, format_reply,
                                  parse_line)

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"


# --- the protocol ---------------------------------------------------------------------
def test_parse_line_takes_id_name_args_and_key_values():
    r = parse_line(b"17 scx-clock cpu=1 extra\r")
    assert (r.id, r.name, r.args, r.line) == ("17", "scx-clock", ["cpu=1", "extra"],
                                              "17 scx-clock cpu=1 extra")
    assert r.kwargs == {"cpu": "1"} and r.int_arg("cpu") == 1
    with pytest.raises(GuestRequestError, match="missing argument clock=N"):
        r.int_arg("clock")


@pytest.mark.parametrize("line, rid, message", [
    (b"17", "17", "no request name"),
    (b"", "-", "expected '<id> <name>"),
    (b"#7 x", "-", "the id must be"),
    (b"7 na\x01me", "7", "byte 0x01 at column 5 is not printable ASCII"),
    (b"7 caf\xc3\xa9", "7", "byte 0xc3"),
    (b"7 bad/name", "7", "request name 'bad/name' is not"),
])
def test_malformed_lines_are_refused_naming_the_problem(line, rid, message):
    with pytest.raises(GuestRequestError, match="malformed request") as e:
        parse_line(line)
    assert e.value.request_id == rid and message in str(e.value)


def test_reply_is_one_printable_line_cut_to_the_limit():
    assert format_reply("3", True) == b"3 ok\n"
    assert format_reply("3", True, "a\nb\x00") == b"3 ok a b?\n"
    assert format_reply("3", False, "") == b"3 error failed\n"
    long = format_reply("3", True, "x" * 10000)
    assert len(long) == MAX_LINE and long.endswith(b"x\n")


def test_line_assembler_joins_pieces_and_discards_an_oversized_line():
    a = LineAssembler(max_line=16)
    assert a.feed(b"1 a") == [] and a.feed(b"b\n2 c\n3") == [b"1 ab", b"2 c"]
    out = a.feed(b"4" + b"y" * 40)  # line "34yyy..." passes 16 bytes: discarded
    assert out == []
    out = a.feed(b"zz\n5 ok\n")
    assert isinstance(out[0], Oversized) and out[0].length == 45 and out[0].head.startswith(b"34y")
    assert out[1] == b"5 ok"


def _channel(handlers):
    served = []

    def serve(entry, request):
        served.append(request.name)
        return entry.handler(None, request)

    ch = RequestChannel(serve, lambda reply: None)
    for name, h in handlers.items():
        ch.on_request(name, h)
    return ch, served


def test_channel_replies_for_every_kind_of_line_and_echoes_the_id():
    def boom(ctx, req):
        raise ValueError("no such thing")

    ch, served = _channel({"echo": lambda ctx, req: " ".join(req.args), "boom": boom,
                           "none": lambda ctx, req: None})
    assert ch.handle(b"a1 echo x y") == b"a1 ok x y\n"
    assert ch.handle(b"a2 none") == b"a2 ok\n"
    assert ch.handle(b"a3 nope") == b"a3 error unknown request 'nope'; the host serves: boom, echo, none\n"
    assert ch.handle(b"a4 boom") == b"a4 error the handler raised ValueError: no such thing\n"
    assert ch.handle(b"a5\x7f echo").startswith(b"- error malformed request: byte 0x7f")
    assert ch.handle(Oversized(b"a6 echo yyyy", 9000)) == (
        b"a6 error request too long: 9000 bytes, at most 4096 with the newline; discarded\n")
    assert served == ["echo", "none", "boom"]  # unknown and malformed lines run nothing


def test_channel_worker_serves_lines_in_order_and_skips_empty_ones():
    replies = []
    done = threading.Event()

    def reply(data):
        replies.append(data)
        if len(replies) == 3:
            done.set()

    ch = RequestChannel(lambda entry, req: entry.handler(None, req), reply)
    ch.on_request("n", lambda ctx, req: req.args[0])
    ch.receive(b"1 n a\n\r\n\n2 n b\n" + b"3 n " + b"c" * (MAX_LINE + 10) + b"\n")
    assert done.wait(10)
    ch.close()
    assert replies[0] == b"1 ok a\n" and replies[1] == b"2 ok b\n"
    assert replies[2].startswith(b"3 error request too long")
    assert [h[1] for h in ch.history] == replies


def test_registration_is_checked():
    ch, _ = _channel({})
    with pytest.raises(GuestRequestError, match="expected 1-64"):
        ch.on_request("bad name", lambda c, r: None)
    with pytest.raises(GuestRequestError, match="not callable"):
        ch.on_request("x", 42)
    ch.on_request("x", lambda c, r: None)
    ch.on_request("x", None)
    assert ch.names() == []


# --- the guest's client, on the host against a pty -----------------------------------------
@pytest.fixture(scope="module")
def client():
    from vmm.machine.initramfs import build_request_client
    try:
        return str(build_request_client())
    except Exception as e:  # no compiler: the message names the package
        pytest.skip(f"cannot build vmm-request: {e}")


def _serve_pty(argv, answer, timeout=10):
    """Run the client on a pty's slave; read its request line from the master, answer
    with answer(line) (bytes or None), return (request, returncode, stdout, stderr)."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([argv[0], "-d", os.ttyname(slave), *argv[1:]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            r, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert r, f"no request line from the client; got {line!r}"
            line += os.read(master, 8192)
        reply = answer(line)
        if reply:
            os.write(master, reply)
        out, err = p.communicate(timeout=timeout)
        return line, p.returncode, out.decode(), err.decode()
    finally:
        os.close(master)
        os.close(slave)


def test_client_sends_its_pid_and_cpu_and_prints_the_ok_text(client):
    def answer(line):
        rid = line.split()[0]
        return b"999 ok stale answer to another request\n" + rid + b" ok wrote clock=5\n"

    line, rc, out, err = _serve_pty([client, "-c", "0", "scx-clock", "flags"], answer)
    rid, name, cpu, extra = line.decode().split()
    assert rid.isdigit() and name == "scx-clock" and cpu == "cpu=0" and extra == "flags"
    assert (rc, out, err) == (0, "wrote clock=5\n", "")


def test_client_exits_1_on_an_error_reply_and_2_on_timeout(client):
    line, rc, out, err = _serve_pty([client, "nope"], lambda l: l.split()[0] + b" error unknown request 'nope'\n")
    assert rc == 1 and out == "" and "error: unknown request 'nope'" in err
    _, rc, _, err = _serve_pty([client, "-t", "1", "slow"], lambda l: None)
    assert rc == 2 and "no reply within the timeout to: slow" in err


def test_client_raw_line_is_sent_verbatim(client):
    line, rc, out, err = _serve_pty([client, "-r", "x\x01y"], lambda l: b"- error malformed request\n")
    assert line == b"x\x01y\n" and rc == 1 and "malformed request" in err


def test_client_raw_line_may_be_oversized_the_host_decides(client):
    line, rc, _, err = _serve_pty([client, "-r", "9 " + "z" * 5000],
                                  lambda l: b"9 error request too long\n")
    assert len(line) == 5003 and rc == 1 and "request too long" in err


def test_client_refuses_bad_usage(client):
    p = subprocess.run([client, "-c", "abc", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage: vmm-request" in p.stderr
    p = subprocess.run([client, "-d", "/nonexistent/tty", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and "cannot open /nonexistent/tty" in p.stderr


# --- the host side on a real Machine ------------------------------------------------------
@pytest.fixture(scope="module")
def m():
    if not GUEST.exists():
        pytest.skip("test guest not built: make guests")
    from conftest import kvm_missing
    why = kvm_missing()
    if why:
        pytest.skip(why)
    with Machine(kernel=str(GUEST), cpus=2, cmdline="mode=loop cpus=2") as machine:
        machine.wait_for_console("2 cpus up", timeout=60)
        yield machine


def _ask(m, line: bytes, timeout=30) -> bytes:
    """Send a line through the port bus as a vCPU's OUTs to COM2 would, then read the
    reply from RBR while LSR says data is ready."""
    m.io_out(0, L.COM2_PORT + 1, 1, 0x01)  # IER: received-data interrupt on
    for b in line:
        m.io_out(0, L.COM2_PORT, 1, b)
    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith(b"\n"):
        assert time.monotonic() < deadline, f"no reply; got {out!r}"
        if m.io_in(0, L.COM2_PORT + 5, 1) & 0x01:
            out += bytes([m.io_in(0, L.COM2_PORT, 1)])
        else:
            time.sleep(0.005)
    return out


@pytest.mark.kvm
def test_com2_is_a_uart_and_com1_is_unchanged(m):
    assert m.io_in(0, L.COM2_PORT + 5, 1) & 0x60 == 0x60  # THRE|TEMT: a transmitter
    m.io_out(0, L.COM2_PORT + 7, 1, 0x5A)
    assert m.io_in(0, L.COM2_PORT + 7, 1) == 0x5A  # the scratch register the 8250 probe uses
    assert m.serial.base == L.COM1_PORT and m.request_serial.base == L.COM2_PORT
    assert L.COM2_PORT not in m.unhandled_io


@pytest.mark.kvm
def test_a_request_runs_its_handler_frozen_and_applies_a_batch_on_its_cpu(m):
    seen = {}

    def scx_clock(ctx, req):
        cpu = req.int_arg("cpu")
        seen["frozen"] = m.coordinator.frozen
        seen["thread"] = threading.current_thread().name
        gen = m.coordinator.generation
        inj = ctx.inject_scx_clock(cpus=[cpu], clock=req.int_arg("clock"))
        seen["one rendezvous"] = m.coordinator.generation == gen  # the batch joined the freeze
        row = inj.rows[0]
        return f"cpu={row.cpu} clock={inj.clock} flags={row.flags_before:#x}->{row.flags_after:#x}"

    m.on_request("scx-clock", scx_clock)
    other = m.read("runqueues", "scx.clock", cpu=0)
    reply = _ask(m, b"41 scx-clock cpu=1 clock=777\n")
    assert reply.startswith(b"41 ok cpu=1 clock=777 flags="), reply
    assert seen == {"frozen": True, "thread": "vmm-requests", "one rendezvous": True}
    assert m.read("runqueues", "scx.clock", cpu=1) == 777
    mask = m.kernel_image.enum("SCX_RQ_CLK_VALID")
    assert m.read("runqueues", "scx.flags", cpu=1) & mask
    assert m.read("runqueues", "scx.clock", cpu=0) == other  # its own CPU only


@pytest.mark.kvm
def test_bad_requests_get_error_replies_and_leave_the_guest_untouched(m):
    def bad_batch(ctx, req):
        # a u32 into the u64 clock: the whole batch is refused before the first write
        return ctx.apply([(T.per_cpu("runqueues", 0, "scx.clock"), V.u64(5)),
                          (T.per_cpu("runqueues", 1, "scx.clock"), V.u32(6))])

    m.on_request("bad-batch", bad_batch)
    m.on_request("raises", lambda ctx, req: 1 / 0)
    before = [m.read("runqueues", "scx.clock", cpu=c) for c in (0, 1)]
    reply = _ask(m, b"1 bad-batch\n")
    assert reply.startswith(b"1 error BatchError: batch entry 1:"), reply
    assert _ask(m, b"2 raises\n") == b"2 error the handler raised ZeroDivisionError: division by zero\n"
    assert _ask(m, b"3 nope x\n").startswith(b"3 error unknown request 'nope'; the host serves: ")
    assert _ask(m, b"4 \x80\n").startswith(b"4 error malformed request: byte 0x80")
    assert _ask(m, b"5 " + b"z" * 5000 + b"\n").startswith(b"5 error request too long: 5003 bytes")
    assert [m.read("runqueues", "scx.clock", cpu=c) for c in (0, 1)] == before
    assert m.running
    reply = _ask(m, b"6 scx-clock cpu=0 clock=9\n")  # and it goes on serving
    assert reply.startswith(b"6 ok cpu=0 clock=9"), reply


@pytest.mark.kvm
def test_the_guest_asks_over_com2_and_reads_what_the_host_wrote():
    """End to end on our test guest (kernels/guests, request=NAME): its BSP writes the
    request to port 0x2f8 itself, polls LSR, reads the reply from RBR, then reads its
    own rq->scx: what the handler wrote in the freeze is there right after."""
    if not GUEST.exists():
        pytest.skip("test guest not built: make guests")

    def scx_clock(ctx, req):
        inj = ctx.inject_scx_clock(cpus=[req.int_arg("cpu")], clock=123456789)
        return f"cpu={inj.rows[0].cpu} flags={inj.rows[0].flags_after:#x}"

    m = Machine(kernel=str(GUEST), cpus=2, cmdline="mode=loop cpus=2 request=scx-clock")
    m.on_request("scx-clock", scx_clock)
    with m:
        got = m.wait_for_console(r"vmm-guest: reply: (.*)\r?\nvmm-guest: after the reply rq 0 "
                                 r"scx.flags=0x([0-9a-f]+) scx.clock=(\d+)\r?\n", timeout=60)  # the whole line
        mask = m.kernel_image.enum("SCX_RQ_CLK_VALID")
        assert got.group(1) == f"1 ok cpu=0 flags={int(got.group(2), 16):#x}"
        assert int(got.group(2), 16) & mask and int(got.group(3)) == 123456789
        assert m.requests.history[0][0] == "1 scx-clock cpu=0"


@pytest.mark.kvm
def test_vmm_run_serve_scx_clock_answers_the_guest():
    """`vmm run --serve-scx-clock`: the built-in scx-clock request (vmm.session
    scx_clock_request), asked for by the test guest's BSP."""
    if not GUEST.exists():
        pytest.skip("test guest not built: make guests")
    import sys
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--kernel", str(GUEST), "--cpus", "2",
                        "--cmdline", "mode=loop cpus=2 loop=100000 exit=5 request=scx-clock",
                        "--serve-scx-clock"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 5, r.stderr
    assert re.search(r"vmm-guest: reply: 1 ok cpus=0 clock=\d+ flags=0x[0-9a-f]+->0x[0-9a-f]+ ok=1",
                     r.stdout), r.stdout


def test_any_bytes_get_exactly_one_bounded_reply_line():
    """Whatever the guest sends (seeded random lines, any bytes), the host answers one
    printable line of at most MAX_LINE bytes and never raises."""
    import random
    rng = random.Random(10)
    replies = []
    ch = RequestChannel(lambda entry, req: entry.handler(None, req), replies.append)
    ch.on_request("n", lambda ctx, req: "\x00\n" * rng.randrange(3000))
    lines = 0
    for _ in range(300):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 6000)))
        if rng.random() < 0.5:
            body = b"%d n " % rng.randrange(99) + body.replace(b"\n", b"")
        for line in LineAssembler().feed(body + b"\n"):
            reply = ch.handle(line)
            lines += 1
            assert reply.endswith(b"\n") and reply.count(b"\n") == 1 and len(reply) <= MAX_LINE
            assert all(0x20 <= b <= 0x7E for b in reply[:-1]), reply[:80]
    assert lines >= 300
