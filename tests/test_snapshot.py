"""Snapshots and clones on our test guest (kernels/guests), on whatever /dev/kvm this host
has (PVM included: every state ioctl round-trips there, tests/test_snapshot_kvm.py).

A clone goes on from the snapshot: its work loops count on, its console prints, host
reads and writes work on it, two clones of one snapshot run at once with their own RAM
(copy-on-write), and every refusal comes before a VM is made."""

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from vmm import KernelTarget as T, KernelValue as V, Machine, Op
from vmm.runtime.snapshot import FORMAT_VERSION, SnapshotError, Snapshot

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"
CMD_UTS, CMD_STOP = 1, 3
NODENAME = T.field("init_uts_ns", "name.nodename")

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
]


def counters(m, cpus=2):
    return [m.read("runqueues", "counter", cpu=c, hot=True) for c in range(cpus)]


def wait_advance(m, cpus=2, timeout=30.0):
    start = counters(m, cpus)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = counters(m, cpus)
        if all(b > a for a, b in zip(start, now)):
            return now
        time.sleep(0.01)
    pytest.fail(f"the clone's CPUs did not go on: {start} -> {now}")


def command(m, cmd):
    m.write("guest_command", V.u32(cmd), hot=True)


@pytest.fixture
def started_too():
    """Stops, when the test ends, the machines given to it (already running)."""
    machines = []
    yield machines.append
    for m in machines:
        m.stop()


@pytest.fixture(scope="module")
def original():
    """The test guest on 2 vCPUs, work loops in ring 0 (emulated on PVM), every CPU up."""
    m = Machine(kernel=str(GUEST), cpus=2, cmdline="mode=loop cpus=2 ring=0", timeout=600)
    m.start()
    m.wait_for_console("2 cpus up", timeout=120)
    wait_advance(m)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def snapdir(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "s"
    snap = original.snapshot(path)
    snap.close()
    return path


def test_snapshot_directory_is_owner_only_sparse_and_described(snapdir, original):
    names = sorted(os.listdir(snapdir))
    assert names == ["manifest.json", "memory.raw", "state.json"]
    for n in names:
        assert stat.S_IMODE(os.stat(snapdir / n).st_mode) == 0o600
    manifest = json.loads((snapdir / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_VERSION
    assert len(manifest["kernel"]["sha256"]) == 64 and manifest["host"]["caps"]["IRQCHIP"] > 0
    raw = os.stat(snapdir / "memory.raw")
    assert raw.st_size == original.memory_size
    assert raw.st_blocks * 512 < original.memory_size // 8  # zero pages are holes


def test_clone_goes_on_and_its_console_prints(started_too, snapdir, original):
    clone = Machine.from_snapshot(snapdir)  # running at once
    started_too(clone)
    assert clone.running and clone.cpus == 2 and clone.memory_size == original.memory_size
    wait_advance(clone)
    clone.apply(Op.WriteKernelCold([(NODENAME, V.bytes(b"clone-one\0"))]))
    command(clone, CMD_UTS)
    clone.wait_for_console("vmm-guest: nodename clone-one", timeout=60)
    with clone.freeze():  # freeze / read on a clone
        a = counters(clone)
        time.sleep(0.2)
        assert counters(clone) == a
    wait_advance(clone)
    assert original.read(NODENAME)[:9] != b"clone-one"  # the clone's writes are its own
    command(clone, CMD_STOP | 0x21 << 8)
    result = clone.wait(timeout=120)
    assert (result.reason, result.exit_code) == ("exit-code", 0x21), clone.console_tail()


def test_two_clones_of_one_in_memory_snapshot_run_at_once(started, original):
    snap = original.snapshot()
    assert snap.path is None
    a = started(Machine.from_snapshot(snap, start=False))
    b = started(Machine.from_snapshot(snap, start=False))
    snap.close()  # the clones keep their mappings
    for m, name in ((a, b"clone-a"), (b, b"clone-b")):
        m.write(NODENAME, V.bytes(name + b"\0"))
    wait_advance(a)
    wait_advance(b)
    assert a.read(NODENAME)[:8] == b"clone-a\0" and b.read(NODENAME)[:8] == b"clone-b\0"
    command(a, CMD_UTS)
    command(b, CMD_UTS)
    a.wait_for_console("nodename clone-a", timeout=60)
    b.wait_for_console("nodename clone-b", timeout=60)
    wait_advance(original)


def test_a_clone_pool_makes_the_next_vm_ahead_and_frees_what_is_left(started_too, original):
    """Machine.clone_pool: clones whose VM and vCPUs were made on the pool's thread while
    the previous clone ran; they go on like any clone; close() frees the unused shells."""
    snap = original.snapshot()
    fds = len(os.listdir("/proc/self/fd"))
    with Machine.clone_pool(snap, ready=1) as pool:
        assert pool.wait_ready(60)
        first = pool.clone()
        started_too(first)
        assert pool.wait_ready(60)  # the next one made while the first runs
        second = pool.clone()
        started_too(second)
        assert (pool.made_ahead, pool.made_late) == (2, 0)
        for m, name in ((first, b"pool-one"), (second, b"pool-two")):
            m.write(NODENAME, V.bytes(name + b"\0"))
            wait_advance(m)
            command(m, CMD_UTS)
            m.wait_for_console(f"nodename {name.decode()}", timeout=60)
        assert pool.wait_ready(60)
    first.stop()
    second.stop()
    snap.close()
    assert len(os.listdir("/proc/self/fd")) <= fds  # the shell left in the pool is freed
    with pytest.raises(SnapshotError, match="closed"):
        pool.clone()


def test_start_false_leaves_the_clone_parked(started, snapdir):
    clone = Machine.from_snapshot(snapdir, start=False)
    try:
        assert not clone.running
        before = clone.memory.read(0, 4096)
        started(clone)
        wait_advance(clone)
        assert clone.memory.read(0, 4096) == before
    finally:
        clone.stop()


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)
    return dst


class Counting(Machine):
    made = 0

    def create_vm(self):
        Counting.made += 1
        super().create_vm()


@pytest.mark.parametrize("damage, message", [
    ("format", "snapshot format 99"),
    ("truncate", "truncated or replaced"),
    ("state", "does not match its checksum"),
    ("memory", "memory.raw does not match its checksum"),
    ("host", "this host lacks"),
    ("missing", "no manifest.json"),
])
def test_refusals_come_before_any_vm(snapdir, tmp_path, damage, message):
    d = _copy(snapdir, tmp_path / "copy")
    manifest = json.loads((d / "manifest.json").read_text())
    if damage == "format":
        manifest["format"] = 99
    elif damage == "truncate":
        os.truncate(d / "memory.raw", 4096)
    elif damage == "state":
        raw = bytearray((d / "state.json").read_bytes())
        raw[100] ^= 1
        (d / "state.json").write_bytes(bytes(raw))
    elif damage == "memory":
        with open(d / "memory.raw", "r+b") as f:
            f.seek(0x100000)
            f.write(b"\x5a")
    elif damage == "host":
        manifest["host"]["cpuid"]["0x7.0"][1] |= 1 << 31  # a feature no host here has? (AVX512VL)
        manifest["host"]["caps"]["NO_SUCH"] = 1
    elif damage == "missing":
        os.unlink(d / "manifest.json")
    if damage in ("format", "host"):
        (d / "manifest.json").write_text(json.dumps(manifest))
    Counting.made = 0
    with pytest.raises(SnapshotError, match=message):
        Counting.from_snapshot(d)
    assert Counting.made == 0


def test_a_closed_snapshot_is_refused(original):
    snap = original.snapshot()
    snap.close()
    with pytest.raises(SnapshotError, match="closed"):
        Machine.from_snapshot(snap)


def test_thaw_false_leaves_the_original_frozen(original):
    snap = original.snapshot(thaw=False)
    try:
        assert original.coordinator.frozen
        a = [original.read("runqueues", "counter", cpu=c) for c in range(2)]
        time.sleep(0.2)
        assert [original.read("runqueues", "counter", cpu=c) for c in range(2)] == a
    finally:
        original.thaw()
        snap.close()
    wait_advance(original)


def test_a_clone_can_be_snapshot_and_cloned_again(started, snapdir):
    clone = started(Machine.from_snapshot(snapdir, start=False))
    clone.write(NODENAME, V.bytes(b"gen-two\0"))
    wait_advance(clone)
    with clone.snapshot() as snap:  # its RAM is the first file's pages plus its own
        grandchild = started(Machine.from_snapshot(snap, start=False))
    assert grandchild.read(NODENAME)[:8] == b"gen-two\0"
    wait_advance(grandchild)


def test_clone_keeps_the_originals_topology(started_too):
    """A clone's CPUID, ACPI tables and memory slots come from the snapshot's topology
    (NUMA nodes with their own RAM, a memory-only node), not a flat machine."""
    m = Machine(kernel=str(GUEST), topology="2n2l1c1t", memory={0: "64M", 1: "64M", 2: "32M"},
                cmdline="mode=loop cpus=2", timeout=600)
    started_too(m)
    m.start()
    m.wait_for_console("2 cpus up", timeout=120)
    snap = m.snapshot()
    try:
        clone = Machine.from_snapshot(snap)
        started_too(clone)
        assert clone.topology == m.topology
        assert clone.topology.node_memory == (64 << 20, 64 << 20, 32 << 20)
        wait_advance(clone)
    finally:
        snap.close()


def test_cli_snapshot_then_run_from_it(tmp_path, capsys):
    """`vmm snapshot DIR` boots, snapshots at the marker and stops; `vmm run
    --from-snapshot DIR` goes on from there (twice: each run a clone) to the guest's own
    exit code; a missing directory is an error before any VM."""
    from vmm.cli import main

    snap = tmp_path / "snap"
    # the work loops end after loop= rounds with exit=: the snapshot comes well before
    assert main(["snapshot", str(snap), "--kernel", str(GUEST), "--cpus", "2", "--quiet",
                 "--cmdline", "mode=loop cpus=2 loop=3000000 exit=7", "--wait-for", "2 cpus up",
                 "--timeout", "300"]) == 0
    err = capsys.readouterr().err
    assert f"vmm run --from-snapshot {snap}" in err and (snap / "manifest.json").exists()
    for _ in range(2):
        assert main(["run", "--from-snapshot", str(snap), "--quiet", "--timeout", "300"]) == 7
        assert "from the snapshot" in capsys.readouterr().err
    assert main(["run", "--from-snapshot", str(tmp_path / "none"), "--quiet"]) == 1
    assert "none" in capsys.readouterr().err
