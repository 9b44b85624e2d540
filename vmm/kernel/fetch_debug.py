"""Debian's sched_ext cloud kernel with its debug vmlinux, for verification.

Debian's trixie-backports ``linux-image-<ver>-cloud-amd64-dbg`` ships the full vmlinux
ELF (.symtab, DWARF, BTF) and the real System.map; tests compare our parsers against
``pahole``/``nm`` on it. The fetching itself is the kernel store's
(``vmm.kernelstore.fetch_debug_vmlinux()``, or ``vmm kernel fetch --debug``: a private
apt configuration, the system's apt sources never touched); this module only names the
cached files, so it needs nothing above the kernel floor.

    python -m vmm.kernel.fetch_debug          # prints the path of the cached vmlinux
"""

from __future__ import annotations

import sys
from pathlib import Path

from vmm.resources import cache_dir as _vmm_cache_dir


def cache_dir() -> Path:
    """Where the kernel store keeps Debian kernels (one folder per ABI; see the layout
    in vmm/kernelstore/__init__.py)."""
    return _vmm_cache_dir("kernels", "debian")


def find_cached() -> Path | None:
    """The newest cached debug vmlinux (with .symtab), or None."""
    hits = sorted(cache_dir().glob("*/vmlinux.dbg"))
    return hits[-1] if hits else None


def system_map_for(vmlinux: Path) -> Path | None:
    """The real System.map fetched with that debug vmlinux."""
    p = vmlinux.with_name("System.map")
    return p if p.exists() else None


if __name__ == "__main__":
    found = find_cached()
    if found is None:
        print("no Debian debug vmlinux cached; fetch it (~350 MB) with: vmm kernel fetch --debug",
              file=sys.stderr)
        sys.exit(1)
    print(found)
    sys.exit(0)
