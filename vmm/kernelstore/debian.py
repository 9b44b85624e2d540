"""Debian's prebuilt sched_ext cloud kernel (and its -dbg vmlinux), fetched through
the private apt."""

from __future__ import annotations

import re
import time
from pathlib import Path

from vmm.errors import ImageError, KernelStoreError
from vmm.hostio import atomic_write
from vmm.image.formats import extract_vmlinux
from vmm.kernelstore.apt import DEBIAN_FLAVOUR, PRIVATE_SUITES, PrivateApt, _deb_members
from vmm.kernelstore.cache import (KernelArtifacts, Progress, _read_manifest, _stderr_progress, _store_lock,
                                    _version_key, _write_manifest, cache_root, list_kernels)


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


def fetch_debug_vmlinux() -> Path:
    """The newest cached Debian debug vmlinux (with .symtab), downloading it once (~350 MB)
    when none is cached. vmm.kernel.fetch_debug finds the cached ones (it may not fetch:
    the kernel floor is below the store)."""
    from vmm.kernel import fetch_debug

    cached = fetch_debug.find_cached()
    if cached:
        return cached
    art = fetch_debian(with_debug=True)
    return fetch_debug.find_cached() or Path(art.vmlinux)


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
    """Decompress a bzImage's payload with vmm.image's extractor (the one decompressor)."""
    try:
        atomic_write(dest, extract_vmlinux(bzimage.read_bytes()))
    except ImageError as e:
        progress(f"debian: could not extract vmlinux from {bzimage.name}: {e}")
        return None
    return dest


