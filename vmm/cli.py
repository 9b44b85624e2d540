"""The ``vmm`` command line.

Exit codes: 0 ok; the guest's own code when it ends through the exit port; 255 when the
guest panicked, crashed (triple fault, internal error) or timed out; 2 usage errors;
1 any other vmm error (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional, Sequence

from .errors import VmmError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CRASH = 255

EXAMPLES = """\
examples:
  vmm run --kernel kernels/guests/out/guest.elf --cmdline 'mode=hello exit=3'
  vmm run --kernel build:7.3 --cpus 2 --inject-scx      # boot, freeze, inject, read back
  vmm run --kernel ./bzImage --initrd ./initrd.cpio.gz --memory 1G --timeout 600
  vmm symbols vmlinux runqueues
  vmm btf vmlinux 'struct rq' scx.flags
  vmm kernel build 7.3 ; vmm kernel fetch ; vmm kernel list
  vmm inject --kernel build:7.3 --cpus 2 --json

exit codes: 0 ok, N the guest's exit-port code, 255 panic/crash/timeout,
            2 usage error, 1 other error
"""


def parse_size(text: str) -> int:
    """'512M', '1G', '65536' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 512M or 2G") from None


def _add_machine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", required=True,
                   help="vmlinux ELF, bzImage, a directory holding them, 'debian' "
                        "(Debian's prebuilt sched_ext kernel) or 'build[:VERSION]'")
    p.add_argument("--initrd", help="initramfs image (default for real Linux: our spin init)")
    p.add_argument("--cmdline", help="kernel command line (default for real Linux: "
                                     "console=ttyS0 reboot=k panic=-1; KASLR stays on; PVM "
                                     "hosts add their options and nokaslr)")
    p.add_argument("--boot-via-decompressor", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="boot a bzImage through its own decompressor (it relocates and "
                        "randomizes itself) or, with --no-boot-via-decompressor, decompress "
                        "it on the host and boot the vmlinux where it was linked; default: "
                        "automatic, the decompressor with VMX/SVM, the host on PVM hosts")
    p.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--memory", type=parse_size, default=parse_size("512M"),
                   help="guest RAM, e.g. 512M, 2G (default 512M)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before the VM is stopped (reason: timeout)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmm", description="KVM micro-VMM for testing Linux kernels and sched_ext "
        "schedulers: boot, freeze every vCPU, write kernel memory, thaw.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="boot a kernel and stream its console",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_machine_options(run)
    run.add_argument("--inject-scx", action="store_true",
                     help="after boot: freeze, write scx.clock and OR SCX_RQ_CLK_VALID into "
                          "scx.flags on every CPU in one cold batch, read back, thaw, stop")
    run.add_argument("--wait-for", default=None,
                     help="console regex to wait for before injecting "
                          "(default: 'Run /init as init process' for real Linux)")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--quiet", action="store_true", help="do not stream the console")
    _add_job_options(run)
    _add_scx_parser(sub)

    inject = sub.add_parser("inject", help="shorthand for run --inject-scx")
    _add_machine_options(inject)
    inject.add_argument("--wait-for", default=None)
    inject.add_argument("--json", action="store_true")
    inject.add_argument("--quiet", action="store_true")

    sym = sub.add_parser("symbols", help="look up kernel symbols")
    sym.add_argument("vmlinux", help="vmlinux ELF, bzImage or System.map")
    sym.add_argument("name", nargs="?", help="symbol name (all symbols when omitted)")
    sym.add_argument("--system-map", help="System.map to use with a bzImage")
    sym.add_argument("--json", action="store_true")

    btf = sub.add_parser("btf", help="print a BTF type layout or one field")
    btf.add_argument("vmlinux", help="vmlinux ELF or bzImage with .BTF")
    btf.add_argument("type", help="type name, e.g. 'struct rq'")
    btf.add_argument("field", nargs="?", help="dotted field path, e.g. scx.flags")
    btf.add_argument("--json", action="store_true")

    kern = sub.add_parser("kernel", help="fetch, build and list kernels under test")
    ksub = kern.add_subparsers(dest="kernel_command", metavar="ACTION")
    ksub.add_parser("fetch", help="download Debian's prebuilt sched_ext kernel")
    kb = ksub.add_parser("build", help="build a sched_ext kernel from Debian's linux-source")
    kb.add_argument("version", nargs="?", default="7.3")
    ksub.add_parser("list", help="list cached kernels")
    kp = ksub.add_parser("path", help="print the artifacts a kernel spec resolves to")
    kp.add_argument("spec")
    for p in (kern,):
        p.add_argument("--json", action="store_true")
    return parser


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def cmd_symbols(args: argparse.Namespace) -> int:
    from .kernel import Kernel, format_symbols

    k = _load_kernel_for_cli(args.vmlinux, getattr(args, "system_map", None), Kernel)
    if args.json:
        if args.name:
            print(json.dumps({"name": args.name, "address": hex(k.symbol(args.name))}))
        else:
            print(json.dumps({n: hex(a) for n, a in k.symbols.items()}))
        return EXIT_OK
    print(format_symbols(k, args.name))
    return EXIT_OK


def cmd_btf(args: argparse.Namespace) -> int:
    from .kernel import Kernel, format_btf

    k = _load_kernel_for_cli(args.vmlinux, None, Kernel)
    if args.json:
        if args.field:
            f = k.btf.field(args.type, args.field)
            print(json.dumps({"type": args.type, "field": args.field, "offset": f.offset,
                              "size": f.size, "bit_offset": f.bit_offset,
                              "bit_size": f.bit_size, "field_type": k.btf.type_name(f.type)}))
        else:
            print(json.dumps({"type": args.type, "size": k.btf.sizeof(args.type)}))
        return EXIT_OK
    print(format_btf(k, args.type, args.field))
    return EXIT_OK


def _load_kernel_for_cli(path: str, system_map: Optional[str], Kernel: Any) -> Any:
    from .machine.images import detect_image_kind

    with open(path, "rb") as f:
        head = f.read(4096)
    kind = detect_image_kind(head)
    if kind == "elf":
        return Kernel.load(vmlinux=path, system_map=system_map)
    if kind == "bzimage":
        return Kernel.load(bzimage=path, system_map=system_map)
    return Kernel.load(system_map=path)


def cmd_kernel(args: argparse.Namespace) -> int:
    from . import kernelstore

    action = args.kernel_command
    if action == "fetch":
        art = kernelstore.fetch_debian()
    elif action == "build":
        art = kernelstore.build_kernel(args.version)
    elif action == "list":
        arts = kernelstore.list_kernels()
        _emit(args, [a.to_json() for a in arts],
              "\n".join(a.describe() for a in arts) or "no kernels cached "
              "(try: vmm kernel build 7.3, or vmm kernel fetch)")
        return EXIT_OK
    elif action == "path":
        art = kernelstore.resolve_kernel(args.spec)
    else:
        print("vmm kernel: say fetch, build, list or path (see vmm kernel --help)", file=sys.stderr)
        return EXIT_USAGE
    _emit(args, art.to_json(), art.describe())
    return EXIT_OK


def cmd_run(args: argparse.Namespace, inject: bool) -> int:
    from .session import run_session

    report = run_session(
        kernel=args.kernel, cpus=args.cpus, memory=args.memory, cmdline=args.cmdline,
        initrd=args.initrd, timeout=args.timeout, inject_scx=inject,
        wait_for=args.wait_for, stream=None if args.quiet or args.json else sys.stdout.buffer,
        boot_via_decompressor=args.boot_via_decompressor,
        exec=getattr(args, "exec", None), include=getattr(args, "include", None))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        sys.stdout.flush()
        print(report.describe(), file=sys.stderr)
    return report.exit_status


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "cpus", 1) is not None and getattr(args, "cpus", 1) < 1:
        parser.error("--cpus must be at least 1")
    started = time.monotonic()
    try:
        if args.command == "symbols":
            return cmd_symbols(args)
        if args.command == "btf":
            return cmd_btf(args)
        if args.command == "kernel":
            return cmd_kernel(args)
        if args.command == "scx":
            return cmd_scx(args)
        if args.command in ("run", "inject"):
            return cmd_run(args, inject=args.command == "inject" or args.inject_scx)
    except VmmError as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `vmm btf ... | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"vmm: interrupted after {time.monotonic() - started:.1f}s", file=sys.stderr)
        return 130
    parser.print_help()
    return EXIT_USAGE


def _add_job_options(p: argparse.ArgumentParser) -> None:
    """The guest job (vmm.machine.guestjob): hosts with VMX/SVM only, refused on PVM."""
    p.add_argument("--exec", metavar="CMD", default=None,
                   help="after boot the guest runs CMD (busybox sh -c); its output streams "
                        "here and its exit status becomes vmm's")
    p.add_argument("--include", metavar="HOST[:GUEST]", action="append", default=[],
                   help="put a host file or directory into the guest (repeatable); an "
                        "executable's shared libraries and loader come along")



def _add_scx_parser(sub) -> None:
    scx = sub.add_parser("scx", help="build sched_ext schedulers of a kernel's own tree")
    ssub = scx.add_subparsers(dest="scx_command", metavar="SUBCOMMAND", required=True)
    b = ssub.add_parser("build", help="build scx_NAME (tools/sched_ext) for a store kernel, "
                                      "cached under ~/.cache/vmm/scx/")
    b.add_argument("name", help="scheduler: simple, qmap, central, ... (scx_ prefix optional)")
    b.add_argument("--kernel", default="build:7.3", help="store kernel spec (default build:7.3)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("-j", "--jobs", type=int, default=None)
    b.add_argument("--json", action="store_true")


def cmd_scx(args: argparse.Namespace) -> int:
    from .scxbuild import build_scheduler

    s = build_scheduler(args.name, args.kernel, jobs=args.jobs, force=args.force)
    _emit(args, {"scheduler": s.name, "binary": str(s.binary), "kernel": s.kernel,
                 "cached": s.cached, "seconds": round(s.seconds, 1)}, str(s.binary))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
