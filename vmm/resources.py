"""Files vmm ships besides its Python code: the sched_ext config fragment and the
sources of the tiny init programs.

In the repository they live under ``kernels/``; an installed package (a wheel, a
non-editable ``pip install .``) carries copies under ``vmm/_data/kernels/`` (put there
by setup.py's build step), so nothing depends on where the repository is.
A leaf module: any layer may import it.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
REPO_ROOT = Path(__file__).resolve().parent.parent

# What the package carries, relative to the repository root (setup.py copies these).
SHIPPED = ("kernels/config/sched_ext.fragment", "kernels/config/sched_ext-scx.fragment",
           "kernels/init/spin-init.c",
           "kernels/init/check-init.c", "kernels/init/vmm-request.c", "kernels/init/sys.h",
           "kernels/init/relay.h", "kernels/init/job-init.c")


def shipped(relpath: str) -> Path:
    """The installed copy of ``relpath`` (e.g. ``kernels/config/sched_ext.fragment``),
    else the repository's own file."""
    installed = PACKAGE_DATA / relpath
    if installed.exists():
        return installed
    return REPO_ROOT / relpath


def cache_dir(*parts: str) -> Path:
    """vmm's cache directory, with `parts` below it: $VMM_CACHE_DIR (``~`` expanded),
    default ~/.cache/vmm. The one place it is worked out (kernel store, initramfs
    images, introspection cache)."""
    base = os.environ.get("VMM_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "vmm"
    return root.joinpath(*parts)
