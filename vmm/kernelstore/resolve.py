"""Finding kernels: what the store holds, and a spec ("debian", "build:7.3", a path)
resolved to artifacts (fetching or building only when nothing suitable is cached)."""

from __future__ import annotations

import os
from pathlib import Path

from vmm.errors import KernelStoreError
from vmm.kernelstore.build import DEFAULT_BUILD_VERSION, FLAVOURS, build_kernel
from vmm.kernelstore.cache import KernelArtifacts, _read_manifest, list_kernels


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
    """A kernel from a spec: "debian", "debian+dbg", "build", "build:7.3", "build:7.3+scx"
    (the flavour with what the tree's sched_ext schedulers need), or a path.

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
        from vmm.kernelstore.debian import fetch_debian  # the apt machinery, only to fetch

        return fetch_debian(with_debug=want_debug)
    if s.split("+")[0] == "build" or s.startswith("build:"):
        spec_body, _, flavour = s.partition("+")
        version = spec_body.partition(":")[2] or DEFAULT_BUILD_VERSION
        if flavour and flavour not in FLAVOURS:
            raise KernelStoreError(f"kernel spec {s!r}: no flavour {flavour!r}; there is "
                                   + ", ".join(f"'+{f}'" for f in sorted(FLAVOURS)))
        return build_kernel(version, FLAVOURS[flavour] if flavour else None)
    if "/" in s or s.startswith(".") or Path(s).exists():
        return _from_path(Path(s).expanduser())
    raise KernelStoreError(
        f"kernel spec {s!r}: expected 'debian', 'debian+dbg', 'build', 'build:VERSION', "
        f"'build:VERSION+scx' or a path"
    )
