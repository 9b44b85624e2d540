"""apt-get/apt-cache with a private sources list and state under the store (the
system's apt setup is never touched), and unpacking members of a .deb."""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Callable

from vmm.errors import KernelStoreError
from vmm.hostio import atomic_output, atomic_write
from vmm.kernelstore.cache import Progress, _sha256, _stderr_progress, cache_root

DEBIAN_FLAVOUR = "cloud-amd64"
# Suites reachable through the private sources list: trixie has linux-source-6.12,
# trixie-backports the 7.x sources and the sched_ext-enabled prebuilt kernels.
PRIVATE_SUITES = ("trixie", "trixie-backports")
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


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
        atomic_write(self.root / "sources.list", "\n".join(lines) + "\n")

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
        """Every package name the private apt lists know (after an update)."""
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
                with atomic_output(out) as f:  # a kill mid-member leaves no partial `out`
                    shutil.copyfileobj(src, f, 1 << 20)
                found[key] = out
    except tarfile.TarError as e:
        raise KernelStoreError(f"{deb.name}: corrupt package data: {e}") from e
    finally:
        if proc.stdout:
            proc.stdout.close()
        proc.wait()
    return found


