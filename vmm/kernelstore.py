"""The kernel store: fetch, build, cache and find the Linux kernels under test.

Two sources, both from Debian's package registry:

* ``fetch_debian()``: Debian's prebuilt sched_ext-enabled cloud kernel from
  trixie-backports (``linux-binary-<abi>-cloud-amd64`` holds the vmlinuz,
  ``linux-base-<abi>-cloud-amd64`` the config).  The ``System.map`` shipped in
  linux-base is a one-line placeholder; the real one, and the full vmlinux with
  ``.symtab``/DWARF/BTF, are only in ``linux-image-<abi>-cloud-amd64-dbg`` (~350 MB),
  so that download is opt-in (``with_debug=True``).  Without it, ``system_map`` is
  None and ``vmlinux`` is the ELF decompressed from the vmlinuz (BTF, no .symtab).
* ``build_kernel()``: ``linux-source-<version>`` built with ``tinyconfig`` plus the
  committed fragment ``kernels/config/sched_ext.fragment``.  This is the kernel that
  boots in reasonable time on PVM hosts (see docs and the shared notes).

Nothing touches the system's apt setup: apt-get runs with a private sources list
(the mirror the machine already uses, suites trixie + trixie-backports) and private
state/cache directories under the store.  apt-get verifies each .deb against the
SHA256 in the signed Packages index; we check it again and record it in a
``manifest.json`` next to the artifacts.

Layout under ``cache_root()`` (``$VMM_CACHE_DIR/kernels``, default ``~/.cache/vmm/kernels``)::

    apt/{sources.list,lists/,cache/,debs/}    private apt state and downloaded .debs
    debian/<abi>/                             vmlinuz, vmlinux, config, [System.map], manifest.json
    build/<version>-<fragment hash>/          bzImage, vmlinux, System.map, config, manifest.json
    build/<version>-<fragment hash>/src/      the unpacked, built source tree
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterable

from vmm.errors import ImageError, KernelStoreError
from vmm.resources import shipped

# The package's own copy when installed, the repository's file otherwise: the cache
# key is the fragment's content, so both hit the same cached build.
DEFAULT_FRAGMENT = shipped("kernels/config/sched_ext.fragment")
DEFAULT_BUILD_VERSION = "7.3"
DEBIAN_FLAVOUR = "cloud-amd64"
# Suites reachable through the private sources list: trixie has linux-source-6.12,
# trixie-backports the 7.x sources and the sched_ext-enabled prebuilt kernels.
PRIVATE_SUITES = ("trixie", "trixie-backports")
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Host tools a kernel build needs, with the Debian package that provides each.
BUILD_TOOLS = {
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "pahole": "dwarves",
    "dpkg-deb": "dpkg",
    "perl": "perl",
}

Progress = Callable[[str], None]


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet(line: str) -> None:
    pass


# --------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelArtifacts:
    """Files of one kernel.  Any of the paths may be None when the source lacks it."""

    name: str
    version: str
    bzimage: Path | None
    vmlinux: Path | None
    system_map: Path | None
    config: Path | None

    @property
    def boot_image(self) -> Path:
        """The file to boot on this host (see boot_image_for)."""
        return self.boot_image_for(None)

    def boot_image_for(self, via_decompressor: bool | None = None) -> Path:
        """The file to boot. ``via_decompressor`` None = automatic: on a host with
        hardware virtualization the bzImage, which decompresses, relocates and
        randomizes itself (KASLR) as under QEMU; on a PVM host the uncompressed vmlinux,
        since the guest's decompressor would run emulated (slow) and its zstd code uses
        BMI2, which PVM cannot emulate. True/False prefer the bzImage/the vmlinux.
        Either falls back to the other file when the preferred one is missing."""
        if via_decompressor is None:
            from vmm.kvm.pvm import is_pvm_host

            via_decompressor = not is_pvm_host()
        first, second = ((self.bzimage, self.vmlinux) if via_decompressor
                         else (self.vmlinux, self.bzimage))
        image = first or second
        if image is None:
            raise KernelStoreError(f"kernel {self.name!r} has neither a vmlinux nor a bzImage")
        return image

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            **{
                k: (str(getattr(self, k)) if getattr(self, k) else None)
                for k in ("bzimage", "vmlinux", "system_map", "config")
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> "KernelArtifacts":
        def path(k):
            v = data.get(k)
            return Path(v) if v else None

        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            bzimage=path("bzimage"),
            vmlinux=path("vmlinux"),
            system_map=path("system_map"),
            config=path("config"),
        )

    def describe(self) -> str:
        parts = [f"{self.name} ({self.version})"]
        for k in ("bzimage", "vmlinux", "system_map", "config"):
            p = getattr(self, k)
            if p is None:
                parts.append(f"  {k:10} -")
            else:
                size = p.stat().st_size if p.exists() else 0
                parts.append(f"  {k:10} {p}  ({size / 1e6:.1f} MB)")
        return "\n".join(parts)


def cache_root() -> Path:
    base = os.environ.get("VMM_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "vmm"
    return root / "kernels"


@contextlib.contextmanager
def _store_lock(progress: Progress):
    """One fetch/build at a time per store: two test processes asking for the same
    kernel must not build into the same directory or share apt's lists at once."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"kernel store {root} is busy (another fetch or build); waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write_manifest(directory: Path, artifacts: KernelArtifacts, **extra) -> None:
    data = {"artifacts": artifacts.to_json(), **extra}
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(directory / "manifest.json")  # atomic: a manifest means "complete"


def _read_manifest(directory: Path) -> KernelArtifacts | None:
    manifest = directory / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
        art = KernelArtifacts.from_json(data["artifacts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # A manifest whose files were deleted is not a cached kernel.
    for k in ("bzimage", "vmlinux", "system_map", "config"):
        p = getattr(art, k)
        if p is not None and not p.exists():
            return None
    return art


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version_key(version: str) -> tuple:
    """Sort key for Debian-ish versions: numeric runs compare as numbers."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p)


# --------------------------------------------------------------------------------------
# Private apt
# --------------------------------------------------------------------------------------
def _configured_mirror() -> tuple[str, str]:
    """(URI, keyring) of the Debian archive the machine's apt already uses.

    Reads deb822 ``*.sources`` and one-line ``*.list`` files; skips security and
    third-party repositories.  Falls back to deb.debian.org.
    """
    candidates: list[Path] = []
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        candidates += sorted(d.glob("*.sources")) + sorted(d.glob("*.list"))
    candidates.append(Path("/etc/apt/sources.list"))
    for f in candidates:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
                    if m:
                        fields[m.group(1).lower()] = m.group(2).strip()
                uri = fields.get("uris", "").split()
                suites = fields.get("suites", "")
                if uri and "/debian" in uri[0] and "security" not in uri[0] + suites:
                    return uri[0].rstrip("/"), fields.get("signed-by") or DEFAULT_KEYRING
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m and "/debian" in m.group(1) and "security" not in line:
                    return m.group(1).rstrip("/"), DEFAULT_KEYRING
    return DEFAULT_MIRROR, DEFAULT_KEYRING


class PrivateApt:
    """apt-get/apt-cache with a private sources list and state under the store."""

    def __init__(self, root: Path | None = None, progress: Progress = _stderr_progress):
        self.root = (root or cache_root()) / "apt"
        self.debs = self.root / "debs"
        self.progress = progress
        self._updated = False

    def _options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.root / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            # We are often root with a cache dir _apt cannot read: don't sandbox.
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip

    def _setup(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "debs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        uri, keyring = _configured_mirror()
        lines = [f"deb [signed-by={keyring}] {uri} {suite} main" for suite in PRIVATE_SUITES]
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")

    def _run(self, tool: str, args: list[str], cwd: Path | None = None) -> str:
        if shutil.which(tool) is None:
            raise KernelStoreError(f"{tool} not found: the kernel store needs a Debian-like host with apt")
        cmd = [tool, "-q", *self._options(), *args]
        try:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        except OSError as e:
            raise KernelStoreError(f"cannot run {tool}: {e}") from e
        if proc.returncode != 0:
            raise KernelStoreError(
                f"{tool} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
            )
        return proc.stdout

    def update(self) -> None:
        """Refresh the private package lists (once per PrivateApt object)."""
        if self._updated:
            return
        self._setup()
        self.progress(f"apt: updating private package lists ({', '.join(PRIVATE_SUITES)})")
        try:
            self._run("apt-get", ["update"])
        except KernelStoreError:
            # Offline: fall back to lists fetched earlier, if any.
            if not any((self.root / "lists").glob("*Packages*")):
                raise
            self.progress("apt: update failed; using the package lists fetched earlier")
        self._updated = True

    def package_names(self) -> list[str]:
        self.update()
        return self._run("apt-cache", ["pkgnames"]).split()

    def show(self, package: str) -> dict[str, str]:
        """Fields of the candidate version of ``package`` (apt-cache show, first stanza)."""
        self.update()
        text = self._run("apt-cache", ["show", "--no-all-versions", package])
        fields: dict[str, str] = {}
        for line in text.split("\n\n")[0].splitlines():
            m = re.match(r"^([A-Za-z0-9-]+):\s*(.*)$", line)
            if m:
                fields[m.group(1)] = m.group(2)
        if "Package" not in fields:
            raise KernelStoreError(f"apt-cache show {package}: no such package in {PRIVATE_SUITES}")
        return fields

    def download(self, package: str) -> tuple[Path, dict]:
        """Download the candidate .deb of ``package``; returns (path, provenance).

        apt-get download checks the SHA256 from the signed index; we check it again
        because the file may have come from an earlier run's cache.
        """
        info = self.show(package)
        version = info["Version"]
        expected = info.get("SHA256", "")
        filename = Path(info.get("Filename", "")).name or f"{package}.deb"
        deb = self.debs / filename
        if not (deb.exists() and expected and _sha256(deb) == expected):
            size_mb = int(info.get("Size", "0")) / 1e6
            self.progress(f"apt: downloading {package} {version} ({size_mb:.1f} MB)")
            self._run("apt-get", ["download", f"{package}={version}"], cwd=self.debs)
            if not deb.exists():  # apt names the file with an epoch-escaped version
                matches = sorted(self.debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
                if not matches:
                    raise KernelStoreError(f"apt-get download {package} left no .deb in {self.debs}")
                deb = matches[-1]
        actual = _sha256(deb)
        if expected and actual != expected:
            deb.unlink(missing_ok=True)
            raise KernelStoreError(f"{deb.name}: SHA256 {actual} != index {expected}; deleted it")
        return deb, {"package": package, "version": version, "deb": deb.name, "sha256": actual}


def _deb_members(deb: Path, want: Callable[[str], str | None], dest: Path) -> dict[str, Path]:
    """Stream a .deb's data tarball and extract the members ``want`` names.

    ``want(member_path)`` returns a key (the caller's name for the file) or None.
    Streaming matters for the 350 MB -dbg package: nothing else is written.
    """
    if shutil.which("dpkg-deb") is None:
        raise KernelStoreError("dpkg-deb not found (package dpkg): needed to unpack .deb files")
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                key = want(member.name) if member.isfile() else None
                if key is None or key in found:
                    continue
                out = dest / key
                src = tar.extractfile(member)
                with open(out, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
                found[key] = out
    except tarfile.TarError as e:
        raise KernelStoreError(f"{deb.name}: corrupt package data: {e}") from e
    finally:
        if proc.stdout:
            proc.stdout.close()
        proc.wait()
    return found


# --------------------------------------------------------------------------------------
# Debian's prebuilt kernel
# --------------------------------------------------------------------------------------
def _is_placeholder_system_map(path: Path) -> bool:
    """Debian's linux-base ships a one-line System.map pointing at the -dbg package."""
    try:
        if path.stat().st_size > 4096:
            return False
        return len(path.read_text(errors="replace").splitlines()) < 10
    except OSError:
        return True


def _newest_debian_abi(apt: PrivateApt) -> str:
    pattern = re.compile(rf"^linux-binary-(\d+\.\d+\.\d+\+deb\d+)-{DEBIAN_FLAVOUR}$")
    versions = [m.group(1) for n in apt.package_names() if (m := pattern.match(n))]
    if not versions:
        raise KernelStoreError(f"no linux-binary-*-{DEBIAN_FLAVOUR} package in {PRIVATE_SUITES}")
    return f"{max(versions, key=_version_key)}-{DEBIAN_FLAVOUR}"


def fetch_debian(
    with_debug: bool = False, *, abi: str | None = None, progress: Progress = _stderr_progress
) -> KernelArtifacts:
    """Debian's newest prebuilt sched_ext cloud kernel from trixie-backports.

    ``with_debug`` adds the -dbg package (~350 MB) for the real System.map and the
    full vmlinux (symbols, DWARF, BTF); only those two files are extracted.
    """
    with _store_lock(progress):
        return _fetch_debian(with_debug, abi, progress)


def _fetch_debian(with_debug: bool, abi: str | None, progress: Progress) -> KernelArtifacts:
    root = cache_root()
    apt = PrivateApt(root, progress)
    if abi is None:
        try:
            abi = _newest_debian_abi(apt)  # e.g. 7.3.4+deb13-cloud-amd64
        except KernelStoreError as e:
            # Offline (or no apt): what the store already holds is the newest we can have.
            for art in list_kernels():
                if art.name.startswith("debian-") and (art.system_map is not None or not with_debug):
                    progress(f"debian: cannot ask apt for the newest kernel ({str(e).splitlines()[0]}); "
                             f"using the cached {art.name}")
                    return art
            raise
    out = root / "debian" / abi
    cached = _read_manifest(out)
    if cached and (not with_debug or cached.system_map is not None):
        return cached
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    provenance = []

    deb, prov = apt.download(f"linux-binary-{abi}")
    provenance.append(prov)
    files = _deb_members(deb, lambda n: "vmlinuz" if n.endswith("/vmlinuz") or "/vmlinuz-" in n else None, out)
    if "vmlinuz" not in files:
        raise KernelStoreError(f"{deb.name} holds no vmlinuz")
    deb, prov = apt.download(f"linux-base-{abi}")
    provenance.append(prov)
    files |= _deb_members(
        deb,
        lambda n: {"config": "config", "System.map": "System.map.placeholder"}.get(n.rsplit("/", 1)[-1]),
        out,
    )
    version = abi.split("+", 1)[0]
    system_map = None
    vmlinux = None
    notes = []
    if with_debug:
        deb, prov = apt.download(f"linux-image-{abi}-dbg")
        provenance.append(prov)
        progress(f"debian: extracting vmlinux and System.map from {deb.name}")

        def want(name: str) -> str | None:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("System.map"):
                return "System.map"
            if base == "vmlinux" or base == f"vmlinux-{abi}":
                return "vmlinux.dbg"
            return None

        files |= _deb_members(deb, want, out)
        deb.unlink()  # 350 MB; the two files we wanted are extracted
        if "System.map" in files and not _is_placeholder_system_map(files["System.map"]):
            system_map = files["System.map"]
        vmlinux = files.get("vmlinux.dbg")
    else:
        notes.append(
            "System.map in linux-base is a placeholder; fetch with with_debug=True "
            "(linux-image-*-dbg) for the real one"
        )
    if vmlinux is None:
        vmlinux = _vmlinux_from_bzimage(files["vmlinuz"], out / "vmlinux", progress)
        if vmlinux is not None:
            notes.append("vmlinux decompressed from vmlinuz: has .BTF, no .symtab")
    art = KernelArtifacts(
        name=f"debian-{abi}",
        version=version,
        bzimage=files["vmlinuz"],
        vmlinux=vmlinux,
        system_map=system_map,
        config=files.get("config"),
    )
    _write_manifest(out, art, source="debian", abi=abi, packages=provenance, notes=notes,
                    seconds=round(time.monotonic() - t0, 1))  # fmt: skip
    progress(f"debian: {art.name} ready in {time.monotonic() - t0:.1f} s")
    return art


def _vmlinux_from_bzimage(bzimage: Path, dest: Path, progress: Progress) -> Path | None:
    """Decompress a bzImage's payload with the machine layer's extractor, if present."""
    try:
        from vmm.machine.images import extract_vmlinux  # the one decompressor (CONTRACTS.md)
    except ImportError:
        progress("debian: vmm.machine.images not available; no vmlinux extracted")
        return None
    try:
        dest.write_bytes(extract_vmlinux(bzimage.read_bytes()))
    except ImageError as e:
        progress(f"debian: could not extract vmlinux from {bzimage.name}: {e}")
        return None
    return dest


# --------------------------------------------------------------------------------------
# Building from linux-source
# --------------------------------------------------------------------------------------
def parse_config(text: str) -> dict[str, str]:
    """Kconfig text -> {CONFIG_X: value}; ``# CONFIG_X is not set`` becomes ``n``."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2)
            continue
        m = re.match(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$", line)
        if m:
            values[m.group(1)] = "n"
    return values


def config_mismatches(fragment: dict[str, str], config: dict[str, str]) -> list[str]:
    """Fragment options that did not end up in .config as asked (Kconfig dropped them)."""
    bad = []
    for key, want in fragment.items():
        got = config.get(key, "n")  # absent from .config means unset
        if got != want:
            bad.append(f"{key}: asked {want}, got {got}")
    return bad


def fragment_hash(fragment: Path) -> str:
    try:
        return hashlib.sha256(fragment.read_bytes()).hexdigest()[:12]
    except OSError as e:
        raise KernelStoreError(f"cannot read config fragment {fragment}: {e}") from e


def _check_build_tools() -> None:
    missing = sorted({pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise KernelStoreError(f"kernel build needs these packages: apt-get install {' '.join(missing)}")


def _stream(cmd: list[str], cwd: Path, progress: Progress, t0: float, log: Path) -> None:
    """Run ``cmd``, showing each output line with the elapsed time; keep a log."""
    tail: list[str] = []
    with open(log, "a") as logf:
        logf.write(f"$ {' '.join(cmd)}\n")
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")  # fmt: skip
        except OSError as e:
            raise KernelStoreError(f"cannot run {cmd[0]}: {e}") from e
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            progress(f"[{time.monotonic() - t0:6.0f}s] {line}")
        rc = proc.wait()
    if rc != 0:
        raise KernelStoreError(f"{' '.join(cmd[:3])}... failed (exit {rc}) in {cwd}; log {log}:\n" + "\n".join(tail))


def build_kernel(
    version: str = DEFAULT_BUILD_VERSION,
    fragment: Path | str | None = None,
    *,
    jobs: int | None = None,
    force: bool = False,
    progress: Progress = _stderr_progress,
    source: Path | str | None = None,
    config: Path | str | None = None,
) -> KernelArtifacts:
    """Build a kernel into the store; cached.

    Default: Debian's ``linux-source-<version>`` with tinyconfig + ``fragment`` (the
    sched_ext fragment shipped with vmm), keyed ``<version>-<fragment hash>``.
    ``config``: start from that full .config instead of tinyconfig (the fragment is
    still merged on top). ``source``: the developer's own tree instead of Debian's,
    built out of tree (``make O=``) into the store so the tree itself is left alone;
    ``make`` runs every time (it is incremental), the store entry is the result.
    """
    fragment = Path(fragment) if fragment else DEFAULT_FRAGMENT
    if source is None and not re.fullmatch(r"\d+\.\d+", version):
        raise KernelStoreError(f"kernel version {version!r}: expected MAJOR.MINOR such as 7.3")
    if source is None and config is None:
        out = cache_root() / "build" / f"{version}-{fragment_hash(fragment)}"
        cached = _read_manifest(out)
        if cached and not force:
            return cached
        _check_build_tools()
        with _store_lock(progress):
            cached = _read_manifest(out)  # another process may have built it meanwhile
            if cached and not force:
                return cached
            return _build_into(out, version, fragment, jobs, force, progress)
    config_path = Path(config).expanduser() if config else None
    if config_path is not None and not config_path.is_file():
        raise KernelStoreError(f"config {config}: no such file")
    h = hashlib.sha256()
    h.update(_read_bytes(fragment, "config fragment"))
    h.update(b"\0" + (_read_bytes(config_path, "config") if config_path else b"tinyconfig"))
    if source is not None:
        tree = Path(source).expanduser().resolve()
        _check_source_tree(tree)
        h.update(b"\0" + str(tree).encode())
        out = cache_root() / "build" / f"src-{tree.name}-{h.hexdigest()[:12]}"
    else:
        tree = None
        out = cache_root() / "build" / f"{version}-{h.hexdigest()[:12]}"
        cached = _read_manifest(out)
        if cached and not force:
            return cached
    _check_build_tools()
    with _store_lock(progress):
        if tree is None:
            cached = _read_manifest(out)
            if cached and not force:
                return cached
        return _build_custom(out, version, tree, config_path, fragment, jobs, force, progress)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KernelStoreError(f"cannot read {what} {path}: {e.strerror}") from e


def _check_source_tree(tree: Path) -> None:
    if not ((tree / "Kbuild").is_file() and (tree / "Kconfig").is_file()
            and (tree / "Makefile").is_file()):
        raise KernelStoreError(f"--source {tree}: not a Linux source tree (no Kbuild, Kconfig "
                               f"and Makefile at its top)")
    if (tree / ".config").exists() or (tree / "include" / "config").is_dir():
        raise KernelStoreError(
            f"--source {tree}: the tree has an in-tree build (.config): vmm builds out of tree "
            f"(make O=) to leave your tree alone, which Kbuild refuses then. Boot your own "
            f"build instead (vmm run --kernel {tree}), or run 'make mrproper' there first")


def merge_fragment(config_text: str, fragment_text: str) -> str:
    """``config_text`` with every option the fragment names set as the fragment says
    (what scripts/kconfig/merge_config.sh -m does); olddefconfig resolves the rest."""
    frag = parse_config(fragment_text)
    kept = [line for line in config_text.splitlines()
            if not ((m := re.match(r"^(?:# )?(CONFIG_[A-Za-z0-9_]+)[= ]", line.strip()))
                    and m.group(1) in frag)]
    for key, value in frag.items():
        kept.append(f"# {key} is not set" if value == "n" else f"{key}={value}")
    return "\n".join(kept) + "\n"


def _build_custom(out: Path, version: str, tree: Path | None, config: Path | None,
                  fragment: Path, jobs: int | None, force: bool,
                  progress: Progress) -> KernelArtifacts:
    """A build from the developer's tree and/or config; output under ``out/obj``."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    provenance = None
    if tree is None:  # Debian's source, unpacked once into this entry
        src_root = out / "src"
        tree = src_root / f"linux-source-{version}"
        if not (tree / ".vmm-unpacked").exists():
            apt = PrivateApt(cache_root(), progress)
            deb, provenance = apt.download(f"linux-source-{version}")
            progress(f"build: unpacking {deb.name}")
            tarballs = _deb_members(deb, lambda n: n.rsplit("/", 1)[-1] if re.search(r"/linux-source-[\d.]+\.tar\.\w+$", n) else None, src_root)  # noqa: E501
            if not tarballs:
                raise KernelStoreError(f"{deb.name} holds no linux-source-*.tar.* tarball")
            tarball = next(iter(tarballs.values()))
            shutil.rmtree(tree, ignore_errors=True)
            _stream(["tar", "-xf", str(tarball)], src_root, _quiet, t0, log)
            tarball.unlink()
            (tree / ".vmm-unpacked").write_text(json.dumps(provenance) + "\n")
        else:
            try:
                provenance = json.loads((tree / ".vmm-unpacked").read_text())
            except ValueError:
                provenance = None
    obj = out / "obj"
    obj.mkdir(exist_ok=True)
    make = ["make", "ARCH=x86_64", "-C", str(tree), f"O={obj}"]
    frag_text = fragment.read_text()
    frag_opts = parse_config(frag_text)
    stamp = obj / ".vmm-configured"
    if force or not stamp.exists():
        t = time.monotonic()
        if config is not None:
            progress(f"build: starting from {config}")
            shutil.copy(config, obj / ".config")
        else:
            _stream(make + ["tinyconfig"], tree, _quiet, t0, log)
        (obj / ".config").write_text(merge_fragment((obj / ".config").read_text(), frag_text))
        _stream(make + ["olddefconfig"], tree, _quiet, t0, log)
        stamp.write_text(out.name + "\n")
        progress(f"[{time.monotonic() - t0:6.0f}s] build: configure done in "
                 f"{time.monotonic() - t:.1f} s")
    mismatches = config_mismatches(frag_opts, parse_config((obj / ".config").read_text()))
    for m in mismatches:
        progress(f"build: WARNING fragment option not applied: {m}")
    t = time.monotonic()
    _stream(make + [f"-j{jobs or os.cpu_count() or 1}", "bzImage"], tree, progress, t0, log)
    built = time.monotonic() - t
    files = {"bzImage": obj / "arch" / "x86" / "boot" / "bzImage", "vmlinux": obj / "vmlinux",
             "System.map": obj / "System.map", "config": obj / ".config"}
    for name, path in files.items():
        if not path.exists():
            raise KernelStoreError(f"build finished but {path} is missing; see {log}")
        shutil.copy2(path, out / name)
    release = subprocess.run(make + ["-s", "kernelrelease"], cwd=tree, capture_output=True,
                             text=True).stdout.strip()
    art = KernelArtifacts(name=f"build-{out.name}", version=release or version,
                          bzimage=out / "bzImage", vmlinux=out / "vmlinux",
                          system_map=out / "System.map", config=out / "config")
    _write_manifest(out, art, source="build", tree=str(tree), base_config=str(config or "tinyconfig"),
                    fragment=str(fragment.resolve()), package=provenance,
                    config_mismatches=mismatches, make_seconds=round(built, 1),
                    seconds=round(time.monotonic() - t0, 1))  # fmt: skip
    progress(f"build: {art.name} ready in {time.monotonic() - t0:.0f} s")
    return art


def _build_into(out: Path, version: str, fragment: Path, jobs: int | None, force: bool,
                progress: Progress) -> KernelArtifacts:  # fmt: skip
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    src_root = out / "src"
    tree = src_root / f"linux-source-{version}"
    phases: dict[str, float] = {}

    def phase(name: str, started: float) -> None:
        phases[name] = round(time.monotonic() - started, 1)
        progress(f"[{time.monotonic() - t0:6.0f}s] build: {name} done in {phases[name]:.1f} s")

    provenance = None
    if not (tree / ".vmm-unpacked").exists():
        t = time.monotonic()
        apt = PrivateApt(cache_root(), progress)
        deb, provenance = apt.download(f"linux-source-{version}")
        progress(f"build: unpacking {deb.name}")
        tarballs = _deb_members(deb, lambda n: n.rsplit("/", 1)[-1] if re.search(r"/linux-source-[\d.]+\.tar\.\w+$", n) else None, src_root)  # noqa: E501
        if not tarballs:
            raise KernelStoreError(f"{deb.name} holds no linux-source-*.tar.* tarball")
        tarball = next(iter(tarballs.values()))
        shutil.rmtree(tree, ignore_errors=True)
        _stream(["tar", "-xf", str(tarball)], src_root, _quiet, t0, log)
        tarball.unlink()
        if not tree.is_dir():
            raise KernelStoreError(f"{tarball.name} did not unpack to {tree}")
        (tree / ".vmm-unpacked").write_text(json.dumps(provenance) + "\n")
        phase("download+unpack", t)
    else:
        try:
            provenance = json.loads((tree / ".vmm-unpacked").read_text())
        except ValueError:
            provenance = None

    make = ["make", "ARCH=x86_64"]
    frag_opts = parse_config(fragment.read_text())
    if not frag_opts:
        raise KernelStoreError(f"config fragment {fragment} sets no CONFIG_ options")
    # Configure once per tree: re-running tinyconfig would touch every generated
    # config header and turn an incremental rebuild into a full one.
    configured = tree / ".vmm-configured"
    if force or not configured.exists() or configured.read_text().strip() != out.name:
        t = time.monotonic()
        _stream(make + ["tinyconfig"], tree, _quiet, t0, log)
        # merge_config.sh -m merges without running Kconfig; olddefconfig resolves deps.
        merge = ["./scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment.resolve())]
        _stream(merge, tree, _quiet, t0, log)
        _stream(make + ["olddefconfig"], tree, _quiet, t0, log)
        configured.write_text(out.name + "\n")
        phase("configure", t)
    mismatches = config_mismatches(frag_opts, parse_config((tree / ".config").read_text()))
    for m in mismatches:
        progress(f"build: WARNING fragment option not applied: {m}")

    t = time.monotonic()
    _stream(make + [f"-j{jobs or os.cpu_count() or 1}", "bzImage"], tree, progress, t0, log)
    phase("make bzImage", t)

    files = {
        "bzImage": tree / "arch" / "x86" / "boot" / "bzImage",
        "vmlinux": tree / "vmlinux",
        "System.map": tree / "System.map",
        "config": tree / ".config",
    }
    for name, path in files.items():
        if not path.exists():
            raise KernelStoreError(f"build finished but {path} is missing; see {log}")
        shutil.copy2(path, out / name)
    kernelrelease = subprocess.run(make + ["-s", "--no-print-directory", "kernelrelease"], cwd=tree, capture_output=True, text=True)
    art = KernelArtifacts(
        name=f"build-{version}-{out.name.split('-', 1)[1]}",
        version=kernelrelease.stdout.strip() or version,
        bzimage=out / "bzImage",
        vmlinux=out / "vmlinux",
        system_map=out / "System.map",
        config=out / "config",
    )
    _write_manifest(out, art, source="build", fragment=str(fragment.resolve()), package=provenance,
                    config_mismatches=mismatches, phases_seconds=phases,
                    seconds=round(time.monotonic() - t0, 1))  # fmt: skip
    progress(f"build: {art.name} ready in {time.monotonic() - t0:.0f} s")
    return art


# --------------------------------------------------------------------------------------
# Finding kernels
# --------------------------------------------------------------------------------------
def list_kernels() -> list[KernelArtifacts]:
    """Every complete kernel in the store (debian first, then builds), newest first."""
    root = cache_root()
    found = []
    for kind in ("debian", "build"):
        arts = [a for d in sorted((root / kind).glob("*")) if (a := _read_manifest(d))]
        found += sorted(arts, key=lambda a: _version_key(a.version), reverse=True)
    return found


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _is_bzimage(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0x202)
        return f.read(4) == b"HdrS"  # boot protocol header magic


def _from_path(path: Path) -> KernelArtifacts:
    """A kernel given by path: a store entry (manifest), else what vmm.kernel.locate
    finds (a build tree, loose files, an image with its vmlinux/System.map/config)."""
    if not path.exists():
        raise KernelStoreError(f"kernel {str(path)!r}: no such file or directory")
    if path.is_dir():
        cached = _read_manifest(path)
        if cached:
            return cached
    from vmm.kernel.locate import locate

    files = locate(path)
    return KernelArtifacts(
        name=(files.tree or path).name,
        version="unknown",
        bzimage=files.bzimage,
        vmlinux=files.vmlinux,
        system_map=files.system_map,
        config=files.config,
    )


def resolve_kernel(spec: str | os.PathLike) -> KernelArtifacts:
    """A kernel from a spec: "debian", "debian+dbg", "build", "build:7.3", or a path.

    "debian" and "build" reuse what the store already holds; they fetch or build
    only when nothing suitable is cached.
    """
    if isinstance(spec, os.PathLike):
        return _from_path(Path(spec))
    s = str(spec).strip()
    if s in ("debian", "debian+dbg"):
        want_debug = s.endswith("+dbg")
        for art in list_kernels():
            if art.name.startswith("debian-") and (art.system_map is not None or not want_debug):
                return art
        return fetch_debian(with_debug=want_debug)
    if s == "build" or s.startswith("build:"):
        version = s.partition(":")[2] or DEFAULT_BUILD_VERSION
        return build_kernel(version)
    if "/" in s or s.startswith(".") or Path(s).exists():
        return _from_path(Path(s).expanduser())
    raise KernelStoreError(
        f"kernel spec {s!r}: expected 'debian', 'debian+dbg', 'build', 'build:VERSION' or a path"
    )


def prune_sources() -> int:
    """Delete the source/object trees of finished builds (~2 GB each); returns how many.

    The artifacts stay usable; a later ``build_kernel(force=True)`` unpacks again
    (from the cached .deb) and rebuilds from scratch.
    """
    pruned = 0
    for d in sorted((cache_root() / "build").glob("*")):
        if (d / "src").is_dir() and _read_manifest(d) is not None:
            shutil.rmtree(d / "src")
            pruned += 1
    return pruned


# --------------------------------------------------------------------------------------
# CLI: python -m vmm.kernelstore fetch-debian|build [VERSION]|list|path SPEC|prune
# --------------------------------------------------------------------------------------
def main(argv: Iterable[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vmm.kernelstore", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch-debian", help="fetch Debian's prebuilt sched_ext cloud kernel")
    f.add_argument("--debug", action="store_true", help="also fetch the -dbg package (~350 MB)")
    b = sub.add_parser("build", help="build linux-source-VERSION with the sched_ext fragment")
    b.add_argument("version", nargs="?", default=DEFAULT_BUILD_VERSION)
    b.add_argument("--fragment", default=str(DEFAULT_FRAGMENT))
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("-j", "--jobs", type=int, default=None)
    b.add_argument("--source", default=None, help="your own kernel tree (built out of tree)")
    b.add_argument("--config", default=None, help="a full .config instead of tinyconfig")
    sub.add_parser("list", help="list kernels in the store")
    pa = sub.add_parser("path", help="print the boot image path of a kernel spec")
    pa.add_argument("spec")
    pa.add_argument("--field", choices=["boot_image", "bzimage", "vmlinux", "system_map", "config"],
                    default="boot_image")  # fmt: skip
    sub.add_parser("prune", help="delete the source trees of finished builds (keeps the kernels)")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        if args.cmd == "fetch-debian":
            print(fetch_debian(with_debug=args.debug).describe())
        elif args.cmd == "build":
            print(build_kernel(args.version, args.fragment, jobs=args.jobs, force=args.force,
                               source=args.source, config=args.config).describe())
        elif args.cmd == "list":
            kernels = list_kernels()
            if not kernels:
                print(f"no kernels in {cache_root()}")
            for art in kernels:
                print(art.describe())
        elif args.cmd == "prune":
            print(f"pruned {prune_sources()} source trees under {cache_root() / 'build'}")
        elif args.cmd == "path":
            art = resolve_kernel(args.spec)
            value = getattr(art, args.field)
            if value is None:
                raise KernelStoreError(f"kernel {art.name} has no {args.field}")
            print(value)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # VmmError and friends: one clear line, no traceback
        from vmm.errors import VmmError

        if not isinstance(e, VmmError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
