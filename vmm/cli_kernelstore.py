"""python -m vmm.kernelstore: the store's command line, which kernels/Makefile calls.

There is one implementation, ``vmm kernel`` (vmm/cli.py); this hands its arguments
over (vmm/kernelstore/__main__.py runs it; it sits beside vmm/cli.py on the top floor,
above the store itself): ``fetch-debian`` is ``vmm kernel fetch``, and ``path`` without ``--field``
prints the boot image's path (the Makefile's and scripts' habit), not the summary.
"""

from __future__ import annotations

import sys
from typing import Iterable


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m vmm.kernelstore`: the old command names, passed on to `vmm kernel`."""
    from vmm.cli import main as vmm_main

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "fetch-debian":
        args[0] = "fetch"
    if args and args[0] == "path" and not any(a == "--field" or a.startswith("--field=") for a in args):
        args += ["--field", "boot_image"]
    return vmm_main(["kernel", *args])
