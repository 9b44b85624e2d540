"""Fetch Debian's sched_ext cloud kernel debug vmlinux (for verification only).

Debian's trixie-backports ``linux-image-<ver>-cloud-amd64-dbg`` ships the full vmlinux
ELF (.symtab, DWARF, BTF). Tests compare our parsers against ``pahole``/``nm`` on it.
Everything goes through a private apt configuration under the cache directory: the
system's apt sources are never touched.

    python -m vmm.kernel.fetch_debug          # prints the path of the cached vmlinux
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from vmm.errors import KernelStoreError

SUITE = "trixie-backports"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def cache_dir() -> Path:
    base = os.environ.get("VMM_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "vmm"
    return root / "kernels" / "debian"


def _mirror_uri() -> str:
    # Reuse the mirror the machine already trusts (first "URIs:"/"deb" line naming /debian).
    for path in glob.glob("/etc/apt/sources.list.d/*.sources") + ["/etc/apt/sources.list"]:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s*)?)(\S+/debian)/?\s*$", text, re.M):
            return m.group(1)
    return DEFAULT_MIRROR


def _run(step: str, cmd: list[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelStoreError(f"{step}: {e}") from None
    if p.returncode != 0:
        raise KernelStoreError(f"{step} failed (rc {p.returncode}): {p.stderr[-2000:]}")
    return p.stdout


def _apt_options(d: Path) -> list[str]:
    lists = d / "apt-lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    src = d / "sources.list"
    src.write_text(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                   f"{_mirror_uri()} {SUITE} main\n")
    return ["-o", f"Dir::Etc::SourceList={src}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={d / 'apt-cache'}"]


def find_cached() -> Path | None:
    """The newest cached debug vmlinux, or None (its System.map lies beside it)."""
    hits = sorted(cache_dir().glob("vmlinux-*-cloud-amd64"))
    return hits[-1] if hits else None


def system_map_for(vmlinux: Path) -> Path | None:
    p = vmlinux.with_name(vmlinux.name.replace("vmlinux-", "System.map-", 1))
    return p if p.exists() else None


def fetch_debug_vmlinux() -> Path:
    """Return the path of the debug vmlinux, downloading it once (~350 MB)."""
    cached = find_cached()
    if cached:
        return cached
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    opts = _apt_options(d)
    debs = sorted(d.glob("linux-image-*-cloud-amd64-dbg_*.deb"))
    if debs:  # an earlier run downloaded but did not finish extracting
        return _extract(d, debs[-1])
    _run("apt-get update (private trixie-backports list)", ["apt-get", *opts, "update"])
    out = _run("apt-cache search", ["apt-cache", *opts, "search", "--names-only",
                                    r"^linux-image-[0-9.+~a-z-]*-cloud-amd64-dbg$"])
    names = sorted(line.split()[0] for line in out.splitlines() if line.strip())
    if not names:
        raise KernelStoreError(f"no linux-image-*-cloud-amd64-dbg package in {SUITE}")
    pkg = names[-1]
    _run(f"apt-get download {pkg}", ["apt-get", *opts, "download", pkg], cwd=d)
    debs = sorted(d.glob(f"{pkg}_*.deb"))
    if not debs:
        raise KernelStoreError(f"apt-get download {pkg} left no .deb in {d}")
    return _extract(d, debs[-1])


def _extract(d: Path, deb: Path) -> Path:
    # Extract only the vmlinux and System.map (the package also holds module debug
    # info); boot/vmlinux-<ver> is a symlink to lib/modules/<ver>/vmlinux.
    listing = _run("dpkg-deb -c", ["dpkg-deb", "-c", str(deb)])
    members = {}
    for ln in listing.splitlines():
        m = re.search(r"(\./usr/lib/debug/lib/modules/([^/]+)/(vmlinux|System\.map))$", ln)
        if m:
            members[m.group(3)] = (m.group(1), m.group(2))
    if "vmlinux" not in members:
        raise KernelStoreError(f"{deb.name} holds no usr/lib/debug/lib/modules/*/vmlinux")
    ver = members["vmlinux"][1]
    paths = [m[0] for m in members.values()]
    try:
        dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", str(d), *paths], stdin=dpkg.stdout,
                             capture_output=True, text=True, timeout=1800)
        dpkg.stdout.close()
        dpkg.wait(timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelStoreError(f"extract vmlinux from {deb.name}: {e}") from None
    if tar.returncode or dpkg.returncode:
        raise KernelStoreError(f"extract vmlinux from {deb.name} failed: {tar.stderr[-2000:]}")
    for kind, (member, _) in members.items():
        (d / member.lstrip("./")).rename(d / f"{kind}-{ver}")
    shutil.rmtree(d / "usr", ignore_errors=True)
    final = d / f"vmlinux-{ver}"
    deb.unlink()  # the vmlinux is all we keep
    return final


if __name__ == "__main__":
    try:
        print(fetch_debug_vmlinux())
    except KernelStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
