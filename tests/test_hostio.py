"""vmm.hostio: whole-or-nothing files, owner-only files, loopback sockets.

A writer killed mid-write (a child process SIGKILLed while it streams a file) leaves no
partial entry under the real name; the next writer sweeps its temporary. Every `.bind(`
in vmm/ goes through hostio.listen_tcp (an ast scan, as tests/test_layers.py does for
imports), so a new listening socket stays on loopback unless a caller names an address.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmm import hostio

VMM = Path(__file__).resolve().parent.parent / "vmm"


def _kill_mid_write(path: Path, tmp_path: Path, private: bool = False) -> None:
    """A child that writes `path` through atomic_output, SIGKILLed while writing."""
    ready = tmp_path / "ready"
    code = (
        "import sys, time, pathlib\n"
        "from vmm.hostio import atomic_output\n"
        f"with atomic_output({str(path)!r}, private={private}) as f:\n"
        "    f.write(b'x' * 65536); f.flush()\n"
        f"    pathlib.Path({str(ready)!r}).write_text('1')\n"
        "    time.sleep(60)\n"
        "    f.write(b'end')\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert child.poll() is None, "the writer ended early"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL


def test_killed_writer_leaves_no_partial_entry_and_next_write_sweeps(tmp_path):
    path = tmp_path / "entry.bin"
    _kill_mid_write(path, tmp_path)
    assert not path.exists()  # never a half-written entry under the real name
    left = [n for n in os.listdir(tmp_path) if n != "ready"]
    assert len(left) == 1 and hostio.is_temp_name(left[0]), left
    hostio.atomic_write(path, b"whole")
    assert path.read_bytes() == b"whole"
    assert sorted(os.listdir(tmp_path)) == ["entry.bin", "ready"]  # the dead one's temp is gone


def test_killed_writer_keeps_the_previous_whole_entry(tmp_path):
    path = tmp_path / "entry.bin"
    hostio.atomic_write(path, b"old and whole")
    _kill_mid_write(path, tmp_path)
    assert path.read_bytes() == b"old and whole"


def test_exception_mid_write_removes_the_temporary(tmp_path):
    path = tmp_path / "entry.bin"
    with pytest.raises(RuntimeError):
        with hostio.atomic_output(path) as f:
            f.write(b"half")
            raise RuntimeError("injected")
    assert os.listdir(tmp_path) == []


def test_a_live_writers_temporary_is_not_swept(tmp_path):
    path = tmp_path / "entry.bin"
    other = tmp_path / f".entry.bin.tmp-{os.getppid()}-abcd"  # our parent: alive
    other.write_bytes(b"in progress")
    hostio.atomic_write(path, b"mine")
    assert other.exists()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_private_files_are_0600_whatever_the_umask(tmp_path, umask_022):
    a = tmp_path / "a"
    hostio.atomic_write(a, b"guest memory", private=True)
    assert _mode(a) == 0o600
    b = tmp_path / "b"
    b.write_bytes(b"old")
    os.chmod(b, 0o644)
    with hostio.open_private(b) as f:  # an existing file is reused: mode set too
        f.write(b"guest output")
    assert _mode(b) == 0o600 and b.read_bytes() == b"guest output"
    c = tmp_path / "c"
    hostio.atomic_write(c, b"not private")
    assert _mode(c) == 0o644


def test_private_temporary_is_0600_while_written(tmp_path, umask_022):
    path = tmp_path / "core"
    with hostio.atomic_output(path, private=True) as f:
        (tmp,) = [p for p in tmp_path.iterdir()]
        assert _mode(tmp) == 0o600  # never readable by others, not even half-written
        f.write(b"x")
    assert _mode(path) == 0o600


def test_vmcore_is_0600_whatever_the_umask(tmp_path, umask_022):
    from vmm.debug import vmcore

    class Ram:
        def read(self, gpa, n):
            return b"\x11" * n

    segs = vmcore.ram_segments([(0, 8192)], 0xFFFF888000000000)
    path = tmp_path / "vmcore"
    vmcore.write(str(path), Ram(), segs, [vmcore.PrStatus(0, {n: 0 for n in vmcore.GREGS})],
                 b"PAGESIZE=4096\n")
    assert _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["vmcore"]


def test_vmcore_failure_mid_write_leaves_nothing(tmp_path):
    from vmm.debug import vmcore
    from vmm.errors import GuestMemoryError

    class Ram:
        def read(self, gpa, n):
            if gpa >= 4096:
                raise GuestMemoryError("injected")
            return b"\x11" * n

    segs = vmcore.ram_segments([(0, 8192)], 0xFFFF888000000000)
    with pytest.raises(vmcore.VmcoreError):
        vmcore.write(str(tmp_path / "vmcore"), Ram(), segs,
                     [vmcore.PrStatus(0, {n: 0 for n in vmcore.GREGS})], b"", chunk=4096)
    assert os.listdir(tmp_path) == []


def test_listen_tcp_defaults_to_loopback():
    s = hostio.listen_tcp()
    try:
        assert s.getsockname()[0] == "127.0.0.1"
        assert _listening_addresses(s.getsockname()[1]) == {"127.0.0.1"}
    finally:
        s.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, st = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) != port or st != "0A":  # 0A: TCP_LISTEN
                continue
            if len(addr) == 8:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
            else:
                raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def test_gdb_stub_listens_on_loopback_only_by_default():
    from vmm.debug.gdbstub import GdbStub

    from types import SimpleNamespace

    # The socket is made before anything asks the machine (a stand-in holding only the
    # debug-register allocator the stub takes its slots from).
    stub = GdbStub(machine=SimpleNamespace())
    try:
        assert stub.sock.getsockname()[0] == "127.0.0.1"
        assert _listening_addresses(stub.port) == {"127.0.0.1"}
    finally:
        stub.sock.close()


def _bind_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in ("bind", "create_server")]


def test_every_bind_in_vmm_goes_through_listen_tcp():
    elsewhere = []
    for path in sorted(VMM.rglob("*.py")):
        if path == VMM / "hostio.py":
            continue
        elsewhere += [f"{path.relative_to(VMM.parent)}:{line}" for line in _bind_calls(path)]
    assert not elsewhere, ("bind a listening socket with vmm.hostio.listen_tcp (loopback "
                           "unless the caller names an address), not directly:\n" + "\n".join(elsewhere))
    assert _bind_calls(VMM / "hostio.py"), "hostio.listen_tcp binds: the scan must see it"
    import inspect

    assert inspect.signature(hostio.listen_tcp).parameters["host"].default == "127.0.0.1"


@pytest.mark.kvm
def test_dump_core_and_dump_on_panic_are_0600_whatever_the_umask(tmp_path, monkeypatch, umask_022):
    """On a live test guest: m.dump_core(path) and the vmcore a panic writes
    (m.dump_on_panic), also over an existing world-readable file."""
    from guest_abi import REPO, require_guests
    from vmm import Machine

    guest = REPO / "kernels" / "guests" / "out" / "guest.elf"
    require_guests(guest)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    core, panic_core = tmp_path / "core", tmp_path / "panic.core"
    for p in (core, panic_core):
        p.write_bytes(b"old")
        os.chmod(p, 0o644)
    m = Machine(str(guest), cpus=2, memory="64M", cmdline="mode=loop cpus=2", timeout=120,
                console=None)
    m.dump_on_panic = str(panic_core)
    m.start()
    try:
        m.wait_for_console("2 cpus up", timeout=60)
        m.dump_core(core)
        assert _mode(core) == 0o600
        m._console_sink(b"Kernel panic - not syncing: test\n")  # as the console pump does
        end = m.wait(timeout=60)
    finally:
        m.stop()
    assert end.reason == "panic" and m.core_path == str(panic_core)
    assert _mode(panic_core) == 0o600 and panic_core.stat().st_size > 3
    # nothing else written beside them ("cache": the symbol cache, when this process had
    # not parsed the guest's symbols yet; vmm.kernel.shared keeps them parsed)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["core", "panic.core"]


def test_open_private_leaves_a_device_mode_alone():
    """A console log or vmcore sent to /dev/null must not chmod the device (root could)."""
    from vmm.hostio import open_private

    before = os.stat("/dev/null").st_mode
    with open_private("/dev/null", buffering=0) as f:
        f.write(b"x")
    assert os.stat("/dev/null").st_mode == before
