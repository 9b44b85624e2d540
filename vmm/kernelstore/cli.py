"""The store's command line: python -m vmm.kernelstore (kernels/Makefile uses it)."""

from __future__ import annotations

import sys
from typing import Iterable

from vmm.errors import KernelStoreError
from vmm.kernelstore.build import DEFAULT_BUILD_VERSION, DEFAULT_FRAGMENT, build_kernel
from vmm.kernelstore.cache import cache_root, list_kernels, prune_sources
from vmm.kernelstore.debian import fetch_debian
from vmm.kernelstore.resolve import resolve_kernel


def main(argv: Iterable[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vmm.kernelstore",
                                description="The kernel store: fetch, build, cache and find the Linux "
                                            "kernels under test.")
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

