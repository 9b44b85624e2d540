"""SIGKILL at random points: `vmm run`, `vmm inject`, `vmm dump` and `vmm gdb` on our test
guest, killed (the whole process group) at seeded random delays, then the host is
checked: no process or thread of the killed one left, nothing in its private TMPDIR,
nothing half-written taken for whole in its private cache (VMM_CACHE_DIR, HOME,
XDG_CACHE_HOME: vmm.resources.cache_dir) or output directory (a dead writer's
temporaries may stay, under their own names, until the next write of that name sweeps
them), every lock file takeable, and the next run succeeds and leaves no temporary.

The seed is printed; VMM_KILL_SEED=N reruns the same delays. The default suite kills
each command a few times; `-m slow` (test_kill_soak) many more.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from guest_abi import REPO, require_guests
from vmm import hostio

ROOT = REPO
GUEST = REPO / "kernels" / "guests" / "out" / "guest.elf"


@pytest.fixture(autouse=True)
def _guests():
    require_guests(GUEST)  # skips without a usable /dev/kvm; builds the guests if needed
LOOP = ["--kernel", str(GUEST), "--cpus", "2", "--cmdline", "mode=loop cpus=2"]
VARIANTS = {  # argv after `vmm`, with {out} the output directory; the clean run's exit code
    "run": (["run", *LOOP, "--timeout", "1"], 255),  # the VM runs out its timeout: 255
    "inject": (["inject", *LOOP], 0),  # boot, freeze, apply, read back, stop
    "dump": (["dump", "{out}/vmcore", *LOOP, "--memory", "64M"], 0),  # freeze, write a vmcore
    "gdb": (["gdb", *LOOP, "--port", "0", "--timeout", "2"], 255),  # a gdb session; then the timeout
}
MAX_DELAY = 1.6  # s: past a clean run's end on this host (python start, boot, work)


def _seed() -> int:
    seed = int(os.environ.get("VMM_KILL_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
    print(f"test_kill: seed {seed} (VMM_KILL_SEED={seed} reruns these delays)")
    return seed


class Host:
    """The private directories of one variant's runs, and the checks after each."""

    def __init__(self, base: Path):
        self.tmpdir = base / "tmp"
        self.cache = base / "cache"
        self.home = base / "home"
        self.xdg = base / "xdg"
        self.out = base / "out"
        self.logs = base / "logs"
        for d in (self.tmpdir, self.cache, self.home, self.xdg, self.out, self.logs):
            d.mkdir(parents=True)
        self.marker = uuid.uuid4().hex
        self.runs = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ, TMPDIR=str(self.tmpdir), VMM_CACHE_DIR=str(self.cache),
                   HOME=str(self.home), XDG_CACHE_HOME=str(self.xdg),
                   VMM_KILL_TEST_MARKER=self.marker, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def start(self, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        self.runs += 1
        log = self.logs / f"{self.runs}.log"
        argv = [a.replace("{out}", str(self.out)) for a in argv]
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "vmm.cli", *argv], cwd=ROOT,
                                    env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group
        return proc, log

    def strays(self, pgid: int) -> list[str]:
        """Processes in the killed group or carrying our marker (children included)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid or self.marker.encode() in environ:
                found.append(f"{entry} {stat[:stat.rindex(')') + 1]} state {fields[0]}")
        return found

    def check_after(self, proc: subprocess.Popen, what: str) -> None:
        pid = proc.pid
        deadline = time.monotonic() + 10
        while (left := self.strays(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"{what}: processes left: {left}"
        assert not Path(f"/proc/{pid}/task").exists(), f"{what}: threads of {pid} left"
        assert not os.listdir(self.tmpdir), f"{what}: left in TMPDIR: {os.listdir(self.tmpdir)}"
        for d in (self.home, self.xdg):
            assert not any(d.rglob("*")), f"{what}: vmm wrote outside VMM_CACHE_DIR: {list(d.rglob('*'))}"
        for path in self.cache.rglob("*"):
            self._check_whole(path, what)
        for path in self.out.rglob("*"):
            self._check_whole(path, what)
        for lock in self.cache.rglob(".lock"):
            with open(lock, "a") as f:  # every lock the code takes is free again
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pytest.fail(f"{what}: {lock} is still locked")
                fcntl.flock(f, fcntl.LOCK_UN)

    def _check_whole(self, path: Path, what: str) -> None:
        if path.is_dir() or path.name == ".lock":
            return
        if hostio.is_temp_name(path.name):
            pid = int(re.search(r"\.tmp-(\d+)-", path.name).group(1))
            assert not Path(f"/proc/{pid}").exists() or pid == os.getpid(), \
                f"{what}: {path}: a live writer's temporary after the kill"
            return
        data = path.read_bytes() if path.suffix != "" or path.name != "vmcore" else b""
        if path.suffix == ".pickle":
            pickle.loads(data)  # a half entry would raise
        elif path.name.endswith(".cpio.gz"):
            gzip.decompress(data)
        elif path.name == "vmcore":
            from vmm.debug.vmcore import read_headers

            with open(path, "rb") as f:
                phdrs, notes = read_headers(f)
            end = max(p[2] + p[5] for p in phdrs)
            assert path.stat().st_size >= end, f"{what}: {path} is cut short"
            assert (path.stat().st_mode & 0o777) == 0o600
        elif path.parent.name == "bin" and path.parent.parent.name == "initramfs":
            assert data[:4] == b"\x7fELF"
        else:
            pytest.fail(f"{what}: unexpected file {path} (a new cache writer? check it here)")

    def check_clean(self) -> None:
        """After a clean run: no temporary left anywhere (the writers swept them)."""
        left = [p for d in (self.cache, self.out) for p in d.rglob("*") if hostio.is_temp_name(p.name)]
        assert not left, f"temporaries left after a clean run: {left}"


def _packet(body: str) -> bytes:
    return f"${body}#{sum(body.encode()) & 0xFF:02x}".encode()


def _gdb_port(log: Path, deadline: float) -> int | None:
    while time.monotonic() < deadline:
        m = re.search(rb"gdb stub on 127\.0\.0\.1:(\d+)", log.read_bytes())
        if m:
            return int(m.group(1))
        time.sleep(0.01)
    return None


def _gdb_session(port: int, detach: bool) -> socket.socket:
    """Connect and ask the stop reason and registers (the stub freezes the guest)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    for body in ("?", "g") + (("D",) if detach else ()):
        s.sendall(_packet(body))
        reply = b""
        while b"#" not in reply[1:] or len(reply) < reply.index(b"#", 1) + 3:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        s.sendall(b"+")
    return s


def _kill_cycle(host: Host, name: str, rng: random.Random, kills: int) -> list[float]:
    argv, _ = VARIANTS[name]
    delays = []
    phases: dict[str, int] = {}
    for i in range(kills):
        delay = round(rng.uniform(0.0, MAX_DELAY), 3)
        delays.append(delay)
        proc, log = host.start(argv)
        t0 = time.monotonic()
        conn = None
        if name == "gdb" and rng.random() < 0.5:  # half the time, killed inside a session
            port = _gdb_port(log, t0 + delay)
            if port is not None:
                try:
                    conn = _gdb_session(port, detach=False)
                except OSError:
                    pass
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        phases[_phase(log.read_bytes())] = phases.get(_phase(log.read_bytes()), 0) + 1
        if conn is not None:
            conn.close()
        host.check_after(proc, f"{name} killed after {delay} s (kill {i + 1} of {kills}, "
                               f"exit {proc.returncode})")
    print(f"test_kill: {name}: where the kills landed (the log's last sign): {phases}")
    return delays


def _phase(log: bytes) -> str:
    """How far the killed command got, from its output."""
    for sign, phase in ((b"VM ended", "ending"), (b"wrote ", "vmcore written"),
                        (b"gdb stub on", "gdb stub up"), (b"jiffies after thaw", "thawed"),
                        (b"kernel layout", "frozen/introspected"), (b"cpus up", "guest up"),
                        (b"vmm: ", "building")):
        if sign in log:
            return phase
    return "starting python"


def _clean_run(host: Host, name: str) -> None:
    argv, expected = VARIANTS[name]
    proc, log = host.start(argv)
    if name == "gdb":
        port = _gdb_port(log, time.monotonic() + 30)
        assert port is not None, log.read_text(errors="replace")
        _gdb_session(port, detach=True).close()
    rc = proc.wait(timeout=60)
    assert rc == expected, f"the run after the kills: exit {rc}\n{log.read_text(errors='replace')}"
    host.check_after(proc, f"{name} clean run")
    host.check_clean()
    if name == "dump":
        assert (host.out / "vmcore").exists()


def _kill_then_run(tmp_path: Path, name: str, kills: int) -> None:
    seed = _seed()
    rng = random.Random(f"{seed}-{name}")
    host = Host(tmp_path)
    # A first clean run fills the caches (so later kills can hit a rewrite of them too).
    _clean_run(host, name)
    delays = _kill_cycle(host, name, rng, kills)
    print(f"test_kill: {name}: killed after {delays} s")
    _clean_run(host, name)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kill_at_random_points(tmp_path, name):
    _kill_then_run(tmp_path, name, kills=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kill_soak(tmp_path, name):
    _kill_then_run(tmp_path, name, kills=40)
