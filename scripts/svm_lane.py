#!/usr/bin/env python3
"""The SVM lane: a real /dev/kvm backed by (emulated) AMD SVM on hosts without VMX/SVM.

Our development and CI machines' /dev/kvm is PVM (guest ring 0 emulated, no system
calls from guest user space); our users' hosts have VMX/SVM.  This lane runs ONE
command inside an L1 Linux guest under QEMU >= 10 in TCG mode with ``-cpu
max,+svm,+npt``: there ``kvm_amd`` loads, /dev/kvm is hardware-virtualization KVM
(nested paging on), and vmm takes its plain path by itself.  QEMU 10, not bookworm's
7.2: under 7.2's nested SVM a Linux 7.3 L2 oopses early (a struct copy loses bytes).
QEMU 10's multi-threaded TCG still puts L1's own state into an L2 vCPU now and then
(README: The SVM lane); VMM_SVM_TCG=thread=single swaps that for guest spinlock hangs
(2 in 9 boots), so multi-threaded TCG stays the default.

    scripts/svm_lane.py setup                   fetch and prepare (idempotent; offline when cached)
    scripts/svm_lane.py info                    boot L1 and print what the lane is
    scripts/svm_lane.py run [--cwd D] [--l1-retries N] [--silence S] -- CMD...
                                                run CMD in L1; exit with CMD's status

The L1 root file system is the host's own ``/``, shared read-only over 9p with a tmpfs
overlay for writes (lost when the lane ends), so CMD sees this very checkout, the
installed Python packages and the kernel cache without copying anything.  We chose
this over virtme-ng (which does the same kind of thing) because virtme-ng wants the
modules of the kernel it boots installed in /lib/modules or a kernel build tree, runs
its own init that we would have to teach to load kvm_amd and check SVM before the
command, and would be one more Python dependency; the ~150 lines of init below do
exactly what the lane needs and nothing more.

Cache (``$VMM_CACHE_DIR/svm``, default ~/.cache/vmm/svm; nothing system-wide changes):

    apt/                         private apt state (bookworm + bookworm-backports)
    qemu/                        dpkg -x of qemu-system-x86, qemu-system-data, seabios
                                 (bookworm-backports) and any shared library the host lacks
    bin/qemu-system-x86_64       wrapper: that QEMU with its libraries and firmware
    l1/vmlinuz, l1/initramfs.cpio.gz   bookworm's linux-image-6.1.0-*-amd64 + our init
    manifest.json                versions and SHA256 of every package (written last)

Packages come from the mirror the machine's apt already uses, through vmm.kernelstore's
private apt (checksums from the signed index).  Exit status of ``run``: CMD's, or
LANE_FAILED (125) when the lane itself fails (no SVM in L1, L1 crashed), or 124 on
--timeout.

A command may also ask for a fresh L1 (``--l1-retries`` counts these tries too): it
writes why into $VMM_SVM_FRESH_L1 and exits FRESH_L1 (75). tests/conftest.py does that
when a test still meets the emulator's SVM fault after its reruns: one CI run saw that
fault five times in a row on one L1 (a Debian-kernel fixture, its first try and three
reruns, then the next test's first try) against 1 boot in 43 of the same kernel in a
fresh L1 (boot_soak.py --peer both --memory 1G: vmm 1 of 22, QEMU 0 of 21), so an L1
that faulted once is not trusted to stop faulting.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from vmm import kernelstore as ks  # noqa: E402  (the private apt helpers we reuse)
from vmm.machine import initramfs  # noqa: E402  (the newc cpio writer)

LANE_FAILED = 125
FRESH_L1 = 75  # the command's "run me again in a fresh L1" (EX_TEMPFAIL)
RECIPE = 1  # bump when the cache layout changes: a cache of another recipe is fetched again
SUITES = ("bookworm", "bookworm-backports")
QEMU_RELEASE = "bookworm-backports"  # QEMU 10 (bookworm's own 7.2 breaks nested SVM)
QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-data", "seabios")
QEMU_MIN_VERSION = (10, 0)
L1_KERNEL = re.compile(r"^linux-image-(6\.1\.0-\d+-amd64)$")  # bookworm's 6.1, not -unsigned
# Loaded in this order; each module's own dependencies (from its .modinfo) come first.
L1_MODULES = (
    "irqbypass", "kvm", "ccp", "kvm-amd",
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "9pnet", "9pnet_virtio", "netfs", "fscache", "9p", "overlay",
)  # fmt: skip
# QEMU: 2 vCPUs (our CI machines have 2 cores; thread=multi runs one host thread per
# vCPU), 6 GiB (TCG allocates guest RAM lazily; the tests' L2 guests take 512 MiB each,
# the tmpfs overlay the rest).
DEFAULT_CPUS = 2
DEFAULT_MEMORY = "6G"
# The host environment passed into L1 besides PATH/HOME/LANG/PYTHONUNBUFFERED: L1's root
# is the host's own, so the caller's Python (a virtualenv, pyenv) is found there as here.
PASS_ENV = re.compile(r"^(PYTHONPATH|PYTHONDONTWRITEBYTECODE|VIRTUAL_ENV|PYENV_[A-Z_]+|VMM_[A-Z0-9_]+"
                      r"|PYTEST_ADDOPTS|CI)$")
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
MARK = "svm-lane:"


def log(msg: str) -> None:
    print(f"{MARK} {msg}", file=sys.stderr, flush=True)


class LaneError(Exception):
    """The lane cannot be set up or did not run the command: the message says why."""


def cache_dir() -> Path:
    base = os.environ.get("VMM_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "vmm") / "svm"


@contextlib.contextmanager
def _lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{root} is busy (another setup); waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------------------
# Fetching: vmm.kernelstore's private apt, pointed at bookworm (+ backports)
# --------------------------------------------------------------------------------------
class LaneApt(ks.PrivateApt):
    """kernelstore's PrivateApt with bookworm suites; ``release`` picks whose candidate
    version wins (bookworm-backports for QEMU: backports are never the default)."""

    def __init__(self, root: Path, release: str | None = None):
        suites = ", ".join(ks.PRIVATE_SUITES)
        super().__init__(root, lambda line: log(line.replace(suites, ", ".join(SUITES))))
        self.release = release

    def _options(self) -> list[str]:
        opts = super()._options()
        return opts + (["-o", f"APT::Default-Release={self.release}"] if self.release else [])

    def _setup(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "debs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        uri, keyring = ks._configured_mirror()
        lines = [f"deb [signed-by={keyring}] {uri} {suite} main" for suite in SUITES]
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")


def _unpack(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaneError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")


def _host_satisfies(dep: str) -> bool:
    """One Depends alternative, e.g. ``libfdt1 (>= 1.6.1)``: installed on the host?"""
    m = re.match(r"^([a-z0-9.+-]+)(?::any)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?$", dep.strip())
    if not m:
        return False
    name, op, version = m.groups()
    q = subprocess.run(["dpkg-query", "-W", "-f", "${Status}|${Version}", name],
                       capture_output=True, text=True)  # fmt: skip
    if q.returncode != 0 or "install ok installed" not in q.stdout:
        return False
    if not op:
        return True
    ops = {">=": "ge", "<=": "le", ">>": "gt", "<<": "lt", "=": "eq"}
    installed = q.stdout.split("|", 1)[1]
    return subprocess.run(["dpkg", "--compare-versions", installed, ops[op], version]).returncode == 0


def _missing_libraries(depends: str) -> list[str]:
    """Library packages in a Depends field that the host does not provide."""
    missing = []
    for group in depends.split(","):
        alternatives = [a.strip() for a in group.split("|") if a.strip()]
        first = re.match(r"^[a-z0-9.+-]+", alternatives[0]).group(0) if alternatives else ""
        if not (first.startswith("lib") or first.startswith("zlib")):
            continue  # qemu-system-common/-data, seabios, ipxe: not shared libraries
        if not any(_host_satisfies(a) for a in alternatives):
            missing.append(first)
    return missing


def _fetch_qemu(apt: LaneApt, dest: Path) -> list[dict]:
    provenance = []
    for pkg in QEMU_PACKAGES:
        deb, prov = apt.download(pkg)
        _unpack(deb, dest)
        provenance.append(prov)
    # Shared libraries: the backport is built against bookworm, so the host's bookworm
    # libraries serve unless a package is absent or too old; those we unpack too.
    todo = _missing_libraries(apt.show("qemu-system-x86").get("Depends", ""))
    done: set[str] = set()
    while todo:
        pkg = todo.pop()
        if pkg in done:
            continue
        done.add(pkg)
        log(f"the host lacks {pkg}: unpacking it into the cache")
        deb, prov = apt.download(pkg)
        _unpack(deb, dest)
        provenance.append(prov)
        todo += _missing_libraries(apt.show(pkg).get("Depends", ""))
    return provenance


def _lib_dirs(qemu_root: Path) -> list[Path]:
    return [d for d in (qemu_root / "usr/lib/x86_64-linux-gnu", qemu_root / "lib/x86_64-linux-gnu")
            if d.is_dir()]  # fmt: skip


def _write_qemu_wrapper(root: Path) -> Path:
    """bin/qemu-system-x86_64: the cached QEMU with its libraries and firmware.  Works
    inside L1 too (the host root is shared), so benchmarks there can run QEMU 10."""
    q = root / "qemu"
    libs = ":".join(str(d) for d in _lib_dirs(q))
    wrapper = root / "bin" / "qemu-system-x86_64"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    ld = f'LD_LIBRARY_PATH="{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" ' if libs else ""
    wrapper.write_text(
        "#!/bin/sh\n# Written by scripts/svm_lane.py: QEMU from bookworm-backports, unpacked here.\n"
        f'{ld}exec "{q}/usr/bin/qemu-system-x86_64" -L "{q}/usr/share/qemu" '
        f'-L "{q}/usr/share/seabios" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _check_qemu(wrapper: Path) -> str:
    """QEMU's version; refuses an older QEMU or one whose libraries do not resolve."""
    q = wrapper.parent.parent / "qemu" / "usr/bin/qemu-system-x86_64"
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in _lib_dirs(q.parent.parent.parent)))
    ldd = subprocess.run(["ldd", str(q)], capture_output=True, text=True, env=env)
    missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    if missing:
        raise LaneError(f"{q} needs shared libraries that neither the host nor the cache has: "
                        f"{', '.join(missing)} (install them with apt-get, or add their packages)")
    out = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise LaneError(f"{wrapper} --version failed: {(out.stdout + out.stderr).strip()[-500:]}")
    if tuple(int(x) for x in m.groups()[:2]) < QEMU_MIN_VERSION:
        raise LaneError(f"QEMU {'.'.join(m.groups())} is too old for nested SVM; need >= 10.0")
    return ".".join(m.groups())


def _modinfo_depends(ko: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d.decode() for d in m.group(1).split(b",") if d] if m else []


def _fetch_l1_kernel(apt: LaneApt, dest: Path) -> tuple[str, dict, list[tuple[str, bytes]]]:
    """(kernel release, provenance, [(module name, .ko bytes)] in load order)."""
    names = [m.group(1) for n in apt.package_names() if (m := L1_KERNEL.match(n))]
    if not names:
        raise LaneError(f"no linux-image-6.1.0-*-amd64 in {', '.join(SUITES)}")
    release = max(names, key=ks._version_key)
    deb, prov = apt.download(f"linux-image-{release}")
    found: dict[str, bytes] = {}

    def want(member: str) -> str | None:
        base = member.rsplit("/", 1)[-1]
        if base == f"vmlinuz-{release}":
            return "vmlinuz"
        if base.endswith(".ko") and f"/lib/modules/{release}/" in member:
            return "ko/" + base[:-3]
        return None

    (dest / "ko").mkdir(parents=True, exist_ok=True)
    files = ks._deb_members(deb, want, dest)
    if "vmlinuz" not in files:
        raise LaneError(f"{deb.name} holds no vmlinuz-{release}")
    available = {k[3:].replace("-", "_"): p for k, p in files.items() if k.startswith("ko/")}
    order: list[str] = []

    def add(name: str) -> None:
        key = name.replace("-", "_")
        if key in found:
            return
        if key not in available:
            raise LaneError(f"{deb.name} has no module {name}")
        data = available[key].read_bytes()
        found[key] = data
        for dep in _modinfo_depends(data):
            add(dep)
        order.append(key)

    for name in L1_MODULES:
        add(name)
    (dest / "modules").mkdir(exist_ok=True)
    for key in order:
        (dest / "modules" / f"{key}.ko").write_bytes(found[key])
    (dest / "modules" / "order").write_text("\n".join(order) + "\n")
    shutil.rmtree(dest / "ko")  # the other ~3000 modules: not needed
    return release, prov, order


# --------------------------------------------------------------------------------------
# The L1 init
# --------------------------------------------------------------------------------------
# busybox sh.  Loads the modules, checks that /dev/kvm is SVM (else writes the reason to
# the io share and stops), mounts host / (9p, read-only) under a tmpfs overlay, and
# chroots into it to run /run/svm-lane/run.sh, whose status it writes back to the io share.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "svm-lane: $*"; }
stop() { sync; reboot -f; sleep 10; }
for m in $(cat /modules); do
    insmod /lib/modules/$m.ko || { say "FAILED: insmod $m.ko"; stop; }
done
mkdir -p /io /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 laneio /io || { say "FAILED: 9p io share"; stop; }
fail() { say "FAILED: $*"; echo "$*" > /io/lane-error; stop; }
up=$(cut -d' ' -f1 /proc/uptime)
npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)
case "$npt" in Y|1) paging="nested paging on";; *) paging="nested paging OFF (npt=$npt)";; esac
ident="emulated AMD SVM under QEMU @QEMU@ TCG, L1 Linux $(uname -r), /dev/kvm: kvm_amd, $paging, $(grep -c ^processor /proc/cpuinfo) vCPUs, $(($(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo) / 1024)) MiB"
[ -c /dev/kvm ] || fail "no /dev/kvm in L1 (kvm modules: $(grep -o '^kvm[a-z_]*' /proc/modules | tr '\n' ' '))"
[ -d /sys/module/kvm_amd ] || fail "kvm_amd is not loaded in L1: /dev/kvm is not SVM"
grep -qw svm /proc/cpuinfo || fail "L1's CPU has no svm flag: /dev/kvm is not SVM"
[ -d /sys/module/kvm_intel ] && fail "kvm_intel is loaded in L1: not the SVM lane"
echo "$ident" > /io/identity
say "L1 up after ${up} s: $ident"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /lower || fail "9p host root"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "overlay on the host root"
for d in proc sys dev run; do mkdir -p /newroot/$d; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/run/svm-lane
mount --move /io /newroot/run/svm-lane
# Loopback up: tests talk TCP to their own host (the gdb stub); L1 has no other network.
ifconfig lo 127.0.0.1 up 2>/dev/null || say "note: loopback not brought up"
chroot /newroot /bin/sh /run/svm-lane/run.sh </dev/null
echo $? > /newroot/run/svm-lane/status
sync
reboot -f
"""


def _busybox(apt: LaneApt, dest: Path) -> dict:
    deb, prov = apt.download("busybox-static")
    files = ks._deb_members(deb, lambda n: "busybox" if n.endswith("/bin/busybox") else None, dest)
    if "busybox" not in files:
        raise LaneError(f"{deb.name} holds no bin/busybox")
    return prov


def _init_text(qemu_version: str) -> str:
    return INIT.replace("@QEMU@", qemu_version)


def _init_hash(qemu_version: str) -> str:
    return hashlib.sha256(_init_text(qemu_version).encode()).hexdigest()[:12]


def _build_initramfs(l1: Path, qemu_version: str) -> Path:
    """l1/initramfs.cpio.gz from l1/busybox, l1/modules/ and INIT (cheap: no network)."""
    modules = (l1 / "modules" / "order").read_text().split()
    busybox = (l1 / "busybox").read_bytes()
    entries = [
        initramfs.directory("dev"),
        initramfs.char_device("dev/console", 5, 1),
        initramfs.directory("proc"),
        initramfs.directory("sys"),
        initramfs.directory("bin"),
        initramfs.file("bin/busybox", busybox, 0o755),
        initramfs.file("init", _init_text(qemu_version).encode(), 0o755),
        initramfs.file("modules", "\n".join(modules).encode() + b"\n"),
    ]
    entries += [initramfs.file(f"lib/modules/{name}.ko", (l1 / "modules" / f"{name}.ko").read_bytes())
                for name in modules]  # fmt: skip
    image = l1 / "initramfs.cpio.gz"
    tmp = image.with_suffix(".tmp")
    tmp.write_bytes(initramfs.create_initramfs(entries))
    tmp.replace(image)
    return image


# --------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------
def _read_manifest(root: Path) -> dict | None:
    try:
        data = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if data.get("recipe") != RECIPE:
        return None
    for key in ("qemu", "vmlinuz", "initramfs"):
        if not Path(data.get(key, "")).is_file():
            return None
    return data


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(root / "manifest.json")  # atomic: a manifest means "complete"


def setup(force: bool = False) -> dict:
    """Fetch and prepare everything once; later calls read the manifest (no network)."""
    root = cache_dir()
    with _lock(root):
        cached = None if force else _read_manifest(root)
        if cached and cached.get("init") != _init_hash(cached["qemu_version"]):
            log("the L1 init changed: rebuilding the initramfs")
            _build_initramfs(root / "l1", cached["qemu_version"])
            cached["init"] = _init_hash(cached["qemu_version"])
            _write_manifest(root, cached)
        if cached:
            return cached
        t0 = time.monotonic()
        log(f"setting up in {root} (QEMU from {QEMU_RELEASE}, L1 kernel from bookworm)")
        bookworm = LaneApt(root)
        backports = LaneApt(root, QEMU_RELEASE)
        bookworm.update()
        backports._updated = True  # the same lists; one update serves both
        for old in ("qemu", "l1", "bin"):
            shutil.rmtree(root / old, ignore_errors=True)
        packages = _fetch_qemu(backports, root / "qemu")
        wrapper = _write_qemu_wrapper(root)
        qemu_version = _check_qemu(wrapper)
        l1 = root / "l1"
        release, prov, modules = _fetch_l1_kernel(bookworm, l1)
        packages.append(prov)
        packages.append(_busybox(bookworm, l1))
        image = _build_initramfs(l1, qemu_version)
        manifest = {
            "recipe": RECIPE,
            "qemu": str(wrapper),
            "qemu_version": qemu_version,
            "l1_release": release,
            "vmlinuz": str(l1 / "vmlinuz"),
            "initramfs": str(image),
            "modules": modules,
            "init": _init_hash(qemu_version),
            "packages": packages,
            "seconds": round(time.monotonic() - t0, 1),
        }
        _write_manifest(root, manifest)
        log(f"set up in {manifest['seconds']} s: QEMU {qemu_version}, L1 Linux {release}")
        return manifest


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------
def _run_script(cmd: list[str], cwd: str) -> str:
    path = [p for p in os.environ.get("PATH", "").split(":") if p.startswith("/")]
    env = {
        "PATH": ":".join(dict.fromkeys(path + list(SYSTEM_PATH))),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "TERM": "dumb",
    }
    env.update({k: v for k, v in os.environ.items() if PASS_ENV.match(k)})
    lines = ["# Written by scripts/svm_lane.py: runs in L1, chrooted into the host root."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    # The lane's identity, for tests that check they run inside it (tests/test_svm_lane.py).
    lines.append('export VMM_SVM_LANE="$(cat /run/svm-lane/identity)"')
    # Outlives L1 (the io share): a pytest run writes its progress there (tests/conftest.py).
    lines.append("export VMM_SVM_PROGRESS=/run/svm-lane/progress")
    # How many fresh L1s are left to ask for (one number), and where to say why.
    lines.append("export VMM_SVM_FRESH_L1=/run/svm-lane/fresh-l1")
    lines.append(f"export VMM_SVM_QEMU={shlex.quote(str(cache_dir() / 'bin' / 'qemu-system-x86_64'))}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 126")
    lines.append("exec " + " ".join(shlex.quote(c) for c in cmd))
    return "\n".join(lines) + "\n"


def qemu_command(manifest: dict, io: Path, cpus: int, memory: str) -> list[str]:
    return [
        manifest["qemu"],
        "-M", "pc", "-accel", "tcg," + os.environ.get("VMM_SVM_TCG", "thread=multi"),
        "-cpu", "max,+svm,+npt",
        "-smp", str(cpus), "-m", memory,
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-no-reboot",
        "-kernel", manifest["vmlinuz"], "-initrd", manifest["initramfs"],
        "-append", "console=ttyS0 quiet panic=-1 oops=panic mitigations=off",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={io},mount_tag=laneio,security_model=none,multidevs=remap",
    ]  # fmt: skip


# The first lines of an L1 kernel crash, kept to name it when L1 ends without a status.
L1_CRASH = re.compile(r"Kernel panic - not syncing|\] (BUG|Oops|general protection fault|"
                      r"kernel BUG|watchdog: BUG)")
SILENT = "L1 printed nothing"  # the start of --silence's line among the crash lines
# A fresh L1 after a crash only when this much of --timeout is left.
MIN_RETRY_S = 300


def _boot_l1(manifest: dict, io: Path, cpus: int, memory: str, timeout: float,
             quiet_identity: bool, silence: float = 0) -> tuple[int | None, list[str]]:
    """Boots L1 once and shows its console. QEMU's status (None when killed at
    ``timeout``) and the lines that said L1's kernel crashed; when L1 printed nothing
    for ``silence`` seconds, QEMU is killed and that is one of the lines."""
    t0 = time.monotonic()
    argv = qemu_command(manifest, io, cpus, memory)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    timed_out = threading.Event()
    timer = None
    if timeout:
        def expire():
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        timer = threading.Timer(timeout, expire)
        timer.start()
    started_cmd = None
    crash: list[str] = []
    heard = [time.monotonic()]  # when L1 last printed
    if silence:
        def listen():
            while proc.poll() is None:
                quiet = time.monotonic() - heard[0]
                if quiet >= silence:
                    crash.append(f"{SILENT} for {silence:.0f} s: it froze (a hung test "
                                 "prints its stacks first: tests/conftest.py)")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    return
                time.sleep(min(5.0, silence - quiet))
        threading.Thread(target=listen, daemon=True, name="l1-silence").start()

    def show(line: str) -> None:
        nonlocal started_cmd
        if line.rstrip().endswith("reboot: Restarting system"):
            return  # the init's own reboot -f: not the command's output
        if line.startswith(f"{MARK} L1 up") and started_cmd is None:
            started_cmd = time.monotonic() - t0
            if quiet_identity:
                return
            line = line.rstrip("\n") + f" (QEMU started {started_cmd:.1f} s ago)\n"
        if len(crash) < 3 and L1_CRASH.search(line):
            crash.append(line.strip())
        sys.stdout.write(line)

    try:
        assert proc.stdout is not None
        pending = ""
        # Chunks, not lines: pytest's progress dots come without a newline.
        while chunk := os.read(proc.stdout.fileno(), 65536):
            heard[0] = time.monotonic()
            pending += chunk.decode(errors="replace").replace("\r", "")
            *lines, pending = pending.split("\n")
            for line in lines:
                show(line + "\n")
            # A partial line goes out now unless it may be one we rewrite or drop.
            if pending and not pending.startswith(("svm-lane"[: len(pending)], "[")):
                sys.stdout.write(pending)
                pending = ""
            sys.stdout.flush()
        if pending:
            show(pending)
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        if timer:
            timer.cancel()
    return (None if timed_out.is_set() else proc.returncode), crash


def run(cmd: list[str], cwd: str, cpus: int = DEFAULT_CPUS, memory: str = DEFAULT_MEMORY,
        timeout: float = 0, quiet_identity: bool = False, l1_retries: int = 0,
        silence: float = 0) -> int:
    """Runs ``cmd`` in L1. When L1's kernel dies before the command's status is written
    (in our runs: the emulator's fault; a command can also crash it, so the tries are
    bounded) and ``l1_retries`` allows, the command runs again in a fresh L1, with the
    same $VMM_SVM_PROGRESS file: a pytest run there resumes (tests/conftest.py) instead
    of starting over. So it does when the command asks for a fresh L1 (FRESH_L1), and
    when L1 printed nothing for ``silence`` seconds (an L1 that froze: one CI run's
    stayed silent from its second test until the 2400 s --timeout)."""
    manifest = setup()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="svm-lane-") as tmp:
        io = Path(tmp)
        (io / "run.sh").write_text(_run_script(cmd, cwd))
        fresh = io / "fresh-l1"
        for attempt in range(1 + l1_retries):
            left = timeout - (time.monotonic() - t0) if timeout else 0
            fresh.write_text(f"{l1_retries - attempt}\n")
            qemu_status, crash = _boot_l1(manifest, io, cpus, memory, left, quiet_identity,
                                           silence)
            elapsed = time.monotonic() - t0
            if qemu_status is None:
                log(f"TIMEOUT: killed L1 after {timeout:.0f} s")
                return 124
            error = io / "lane-error"
            if error.exists():
                log(f"FAILED: {error.read_text().strip()}")
                log("the lane is not SVM: nothing was run")
                return LANE_FAILED
            status = io / "status"
            asked = fresh.read_text().strip() if fresh.exists() else ""
            requested = False
            if status.exists():
                code = int(status.read_text().strip() or LANE_FAILED)
                if code != FRESH_L1 or asked.isdigit():
                    log(f"command exited {code}; lane total {elapsed:.1f} s"
                        + (f", {attempt + 1} L1 boots" if attempt else ""))
                    return code
                what = f"the command asked for a fresh L1 ({asked})"
                requested = True
                status.unlink()
            else:
                what = f"L1 ended (QEMU status {qemu_status}) without the command's status"
            froze = [c for c in crash if c.startswith(SILENT)]
            crash = [c for c in crash if c not in froze]
            if crash:
                what += ": L1's kernel crashed (" + " / ".join(crash) + ")"
            if froze:
                what += ": " + froze[0]
            left = timeout - elapsed if timeout else MIN_RETRY_S
            if attempt == l1_retries or left < MIN_RETRY_S:
                why = "" if attempt == l1_retries else f" ({left:.0f} s left of --timeout)"
                log(f"FAILED: {what}{why}: see the console above")
                return LANE_FAILED
            cause = ("" if requested else " (the lane's emulator, or something the command did to "
                     "L1's kernel)")
            log(f"{what} after {elapsed:.0f} s{cause}; "
                f"running it again in a fresh L1 (L1 boot {attempt + 2} of {l1_retries + 1})")
    return LANE_FAILED


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("setup", help="fetch and prepare the lane's QEMU and L1 (idempotent)")
    s.add_argument("--force", action="store_true", help="fetch and rebuild even when cached")
    for name, help_ in (("info", "boot L1 and print what the lane is"),
                        ("run", "run one command in L1; exit with its status")):  # fmt: skip
        p = sub.add_parser(name, help=help_)
        p.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="L1 vCPUs (default %(default)s)")
        p.add_argument("--memory", default=DEFAULT_MEMORY, help="L1 RAM (default %(default)s)")
        p.add_argument("--timeout", type=float, default=0, help="kill L1 after this many seconds")
        if name == "run":
            p.add_argument("--cwd", default=os.getcwd(), help="directory to run in (default: here)")
            p.add_argument("--l1-retries", type=int, default=0, metavar="N",
                           help="when L1's kernel crashes, run the command again in a fresh "
                                "L1, at most N times (a pytest run resumes: tests/conftest.py)")
            p.add_argument("--silence", type=float, default=0, metavar="S",
                           help="when L1 prints nothing for S seconds, take it as frozen: "
                                "kill it and go on as after a crash (--l1-retries)")
            p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = ap.parse_args(argv)
    try:
        if args.what == "setup":
            t0 = time.monotonic()
            m = setup(force=args.force)
            print(f"svm lane ready in {time.monotonic() - t0:.1f} s: QEMU {m['qemu_version']} "
                  f"({m['qemu']}), L1 Linux {m['l1_release']}, cache {cache_dir()}")
            return 0
        if args.what == "info":
            return run(["sh", "-c", 'echo "$VMM_SVM_LANE"'], "/", args.cpus, args.memory,
                       args.timeout, quiet_identity=True)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            ap.error("run: give the command after --")
        return run(cmd, os.path.abspath(args.cwd), args.cpus, args.memory, args.timeout,
                   l1_retries=args.l1_retries, silence=args.silence)
    except (LaneError, ks.KernelStoreError) as e:
        log(f"FAILED: {e}")
        return LANE_FAILED


if __name__ == "__main__":
    sys.exit(main())
