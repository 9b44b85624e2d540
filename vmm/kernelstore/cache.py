"""The store's cache: where it lives, its artifacts and manifests, its lock, pruning."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from vmm.errors import KernelStoreError
from vmm.hostio import atomic_write
from vmm.resources import cache_dir

Progress = Callable[[str], None]


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet(line: str) -> None:
    pass


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
        """The artifacts as plain data (paths as strings) for manifest.json."""
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
        """Artifacts from to_json()'s data."""
        def path(k):
            v = data.get(k)
            return Path(v) if v else None

        # A manifest written by an older vmm may hold make's "Entering directory" lines
        # around the kernel release: keep the release line only.
        lines = [l for l in str(data["version"]).splitlines()
                 if l.strip() and not l.startswith("make")]
        return cls(
            name=str(data["name"]),
            version=lines[0].strip() if lines else str(data["version"]),
            bzimage=path("bzimage"),
            vmlinux=path("vmlinux"),
            system_map=path("system_map"),
            config=path("config"),
        )

    def describe(self) -> str:
        """Name, version and the files there are, in words."""
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
    """The store's directory: vmm's cache directory (vmm.resources.cache_dir) / kernels."""
    return cache_dir("kernels")


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
    # Written last and atomically (fsynced, renamed): a manifest means "complete".
    atomic_write(directory / "manifest.json", json.dumps(data, indent=2, sort_keys=True) + "\n")


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


def list_kernels() -> list[KernelArtifacts]:
    """Every complete kernel in the store (debian first, then builds), newest first."""
    root = cache_root()
    found = []
    for kind in ("debian", "build"):
        arts = [a for d in sorted((root / kind).glob("*")) if (a := _read_manifest(d))]
        found += sorted(arts, key=lambda a: _version_key(a.version), reverse=True)
    return found


def prune_sources() -> int:
    """Delete the source/object trees of finished builds (~2 GB each); returns how many.

    The artifacts stay usable; a later ``build_kernel(force=True)`` unpacks again
    (from the cached .deb) and rebuilds from scratch.
    """
    pruned = 0
    for d in sorted((cache_root() / "build").glob("*")):
        if (d / "src").is_dir() and _read_manifest(d) is not None:
            # The "unpacked" marks go first: a prune killed half way leaves a tree that
            # the next build unpacks again instead of building from what is left.
            for mark in (d / "src").glob("*/.vmm-unpacked"):
                mark.unlink()
            shutil.rmtree(d / "src")
            pruned += 1
    return pruned
