"""Debian's sched_ext cloud kernel with its debug vmlinux, for verification.

Debian's trixie-backports ``linux-image-<ver>-cloud-amd64-dbg`` ships the full vmlinux
ELF (.symtab, DWARF, BTF) and the real System.map; tests compare our parsers against
``pahole``/``nm`` on it. The fetching itself is the kernel store's
(``vmm.kernelstore.fetch_debian(with_debug=True)``: a private apt configuration, the
system's apt sources never touched); this module only names the files.

    python -m vmm.kernel.fetch_debug          # prints the path of the cached vmlinux
"""

from __future__ import annotations

import sys
from pathlib import Path


def cache_dir() -> Path:
    """Where the kernel store keeps Debian kernels (one folder per ABI)."""
    from vmm import kernelstore

    return kernelstore.cache_root() / "debian"


def find_cached() -> Path | None:
    """The newest cached debug vmlinux (with .symtab), or None."""
    hits = sorted(cache_dir().glob("*/vmlinux.dbg"))
    return hits[-1] if hits else None


def system_map_for(vmlinux: Path) -> Path | None:
    """The real System.map fetched with that debug vmlinux."""
    p = vmlinux.with_name("System.map")
    return p if p.exists() else None


def fetch_debug_vmlinux() -> Path:
    """Return the path of the debug vmlinux, downloading it once (~350 MB)."""
    cached = find_cached()
    if cached:
        return cached
    from vmm import kernelstore

    art = kernelstore.fetch_debian(with_debug=True)
    return find_cached() or Path(art.vmlinux)


if __name__ == "__main__":
    print(fetch_debug_vmlinux())
    sys.exit(0)
