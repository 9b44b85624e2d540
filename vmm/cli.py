"""The ``vmm`` command line.

Exit codes: 0 ok; the guest's own code when it ends through the exit port; 255 when the
guest panicked, crashed (triple fault, internal error) or timed out; 2 usage errors;
1 any other vmm error (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from .errors import KernelStoreError, VmmError
from .machine.vmexit import EXIT_CODE_CRASH

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CRASH = EXIT_CODE_CRASH  # panic, crash, timeout: the machine's own figure


class UsageError(VmmError):
    """A command line that cannot work as given (exit 2)."""

EXAMPLES = """\
examples:
  vmm run --kernel kernels/guests/out/guest.elf --cmdline 'mode=hello exit=3'
  vmm run --kernel build:7.3 --cpus 2 --inject-scx      # boot, freeze, inject, read back
  vmm run --kernel ./bzImage --initrd ./initrd.cpio.gz --memory 1G --timeout 600
  vmm symbols vmlinux runqueues
  vmm btf vmlinux 'struct rq' scx.flags
  vmm kernel build 7.3 ; vmm kernel fetch ; vmm kernel list
  vmm inject --kernel build:7.3 --cpus 2 --json
  vmm run --kernel build:7.3+scx --cpus 2 --serve-scx-clock --exec 'vmm-request -c 1 scx-clock'
                                                        # the guest asks for the batch (VMX/SVM)

exit codes: 0 ok, N the guest's exit-port code, 255 panic/crash/timeout,
            2 usage error, 1 other error
"""


def parse_size(text: str) -> int:
    """'512M', '1G', '65536' -> bytes (vmm.machine.layout.parse_size, as argparse wants it)."""
    from .machine.layout import parse_size as layout_parse_size
    try:
        return layout_parse_size(text)
    except VmmError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 512M or 2G") from None


def _add_machine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default=None,
                   help="vmlinux ELF, bzImage, a directory holding them (a kernel build "
                        "tree too), 'debian' (Debian's prebuilt sched_ext kernel) or "
                        "'build[:VERSION]' (default: the build tree the current directory "
                        "is in)")
    p.add_argument("--vmlinux", help="vmlinux with symbols and BTF (default: found beside "
                                     "the image, in its build tree or under /usr/lib/debug)")
    p.add_argument("--system-map", help="System.map for the symbols (default: found beside "
                                        "the image, in its build tree or in /boot)")
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
    p.add_argument("--cpus", type=int, default=None,
                   help="vCPUs (default 1, or what --topology implies)")
    p.add_argument("--topology", default=None, metavar="SPEC",
                   help="NUMA nodes, LLCs, cores per LLC, threads per core, e.g. 2n4l2c2t "
                        "(16 vCPUs), the old 2s4c2t, or a preset's name (vmm.topology.presets())")
    p.add_argument("--memory", type=parse_size, default=parse_size("512M"),
                   help="guest RAM, e.g. 512M, 2G (default 512M)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before the VM is stopped (reason: timeout)")
    p.add_argument("--console-log", metavar="FILE", default=None,
                   help="write the whole console to FILE (created owner-only, 0600; "
                        "memory keeps only the last --console-window bytes)")
    p.add_argument("--console-window", metavar="SIZE", type=parse_size, default=None,
                   help="console bytes kept in memory, e.g. 4M (default 4M)")
    p.add_argument("--no-config-check", dest="config_check", action="store_false",
                   help="boot even when the kernel's config (.config beside the image, in "
                        "its build tree, /boot/config-*, or IKCONFIG) lacks what the run "
                        "needs (serial console, initramfs, SMP, BTF, sched_ext)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `vmm` command and its subcommands."""
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
    run.add_argument("--serve-scx-clock", action="store_true",
                     help="serve the guest's 'scx-clock [cpu=N] [clock=N]' requests (COM2, "
                          "/dev/ttyS1; in a job: vmm-request -c 1 scx-clock): freeze, the scx "
                          "batch on that CPU, thaw, reply (docs/requests.md)")
    run.add_argument("--monitor", type=float, default=None, metavar="SECONDS",
                     help="from the boot marker (or the job's start) to the VM's end, sample "
                          "every CPU's run queue from guest memory every SECONDS, without "
                          "freezing (m.monitor); the report names any stalled CPU")
    run.add_argument("--monitor-json", default=None, metavar="FILE",
                     help="with --monitor: write its samples there as JSON (owner-only)")
    run.add_argument("--plot", default=None, metavar="FILE",
                     help="with --monitor: draw its series to FILE (.png, .svg or .html; "
                          "needs matplotlib: pip install 'vmm[plot]'), stalls and the "
                          "scheduler's exit marked")
    run.add_argument("--scx-state", action="store_true",
                     help="follow sched_ext's state from guest memory (m.scx.state()) over the "
                          "run and report each change: attach, the scheduler's name, its exit "
                          "kind, reason and message")
    run.add_argument("--from-snapshot", metavar="DIR", default=None,
                     help="go on from a snapshot directory (vmm snapshot) instead of booting: "
                          "its kernel, CPUs, memory and command line; --kernel is not needed")
    _add_job_options(run)
    snap = sub.add_parser("snapshot", help="boot, and when the console matches --wait-for "
                          "(default: the boot marker) write a snapshot directory and stop")
    snap.add_argument("directory", help="where the snapshot goes (vmm run --from-snapshot DIR "
                                        "goes on from it; each run is a copy-on-write clone)")
    _add_machine_options(snap)
    snap.add_argument("--wait-for", default=None,
                      help="console regex after which to snapshot (default: 'Run /init as init "
                           "process' for real Linux)")
    snap.add_argument("--json", action="store_true", help="print the result as JSON")
    snap.add_argument("--quiet", action="store_true", help="do not stream the console")
    _add_job_options(snap)
    _add_scx_parser(sub)

    inject = sub.add_parser("inject", help="shorthand for run --inject-scx")
    _add_machine_options(inject)
    inject.add_argument("--wait-for", default=None)
    inject.add_argument("--json", action="store_true")
    inject.add_argument("--quiet", action="store_true")

    sym = sub.add_parser("symbols", help="look up kernel symbols")
    sym.add_argument("vmlinux", help="vmlinux ELF, bzImage, System.map or a directory "
                                     "holding them (a kernel build tree too)")
    sym.add_argument("name", nargs="?", help="symbol name (all symbols when omitted)")
    sym.add_argument("--system-map", help="System.map to use with a bzImage or a vmlinux "
                                          "without .symtab (default: the one beside it)")
    sym.add_argument("--json", action="store_true")

    btf = sub.add_parser("btf", help="print a BTF type layout or one field")
    btf.add_argument("vmlinux", help="vmlinux ELF or bzImage with .BTF, or a directory "
                                     "holding them")
    btf.add_argument("type", help="type name, e.g. 'struct rq'")
    btf.add_argument("field", nargs="?", help="dotted field path, e.g. scx.flags")
    btf.add_argument("--json", action="store_true")

    kern = sub.add_parser("kernel", help="fetch, build and list kernels under test")
    ksub = kern.add_subparsers(dest="kernel_command", metavar="ACTION")
    kf = ksub.add_parser("fetch", help="download Debian's prebuilt sched_ext kernel")
    kf.add_argument("--debug", action="store_true",
                    help="also the -dbg package: full vmlinux and System.map (~350 MB)")
    kb = ksub.add_parser("build", help="build a sched_ext kernel from Debian's linux-source, "
                                       "or from your own tree (--source) or config (--config)")
    kb.add_argument("version", nargs="?", default="7.3")
    kb.add_argument("--source", help="your kernel source tree (default: Debian's "
                                     "linux-source-VERSION)")
    kb.add_argument("--config", help="a full .config to start from (default: tinyconfig "
                                     "plus the sched_ext fragment)")
    kb.add_argument("--fragment", help="config fragment merged on top (default: the "
                                       "sched_ext fragment shipped with vmm)")
    kb.add_argument("--force", action="store_true", help="rebuild even when cached")
    kb.add_argument("-j", "--jobs", type=int, default=None)
    ksub.add_parser("list", help="list cached kernels")
    kp = ksub.add_parser("path", help="print the artifacts a kernel spec resolves to")
    kp.add_argument("spec")
    kp.add_argument("--field", choices=["boot_image", "bzimage", "vmlinux", "system_map", "config"],
                    help="print only that file's path")
    ksub.add_parser("prune", help="delete the source trees of finished builds (keeps the kernels)")
    # Every subcommand takes its options after its own name (`vmm kernel list --json`);
    # `vmm kernel --json list` keeps working.
    kern.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    for p in (kf, kb, kp, ksub.choices["list"]):
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print the result as JSON")
    from .cli_debug import add_parser as add_dump_parser  # `vmm dump`, `vmm gdb`
    add_dump_parser(sub, _add_machine_options)
    from .cli_report import add_parser as add_report_parser  # `vmm report`
    add_report_parser(sub)
    return parser


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def cmd_symbols(args: argparse.Namespace) -> int:
    """`vmm symbols`: list or look up a kernel's symbols (text or --json)."""
    from .kernel import format_symbols
    from .kernel.locate import require_symbols

    k, files = _load_kernel_for_cli(args.vmlinux, getattr(args, "system_map", None))
    if args.name:
        require_symbols(k, files)
    if args.json:
        if args.name:
            print(json.dumps({"name": args.name, "address": hex(k.symbol(args.name))}))
        else:
            print(json.dumps({n: hex(a) for n, a in k.symbols.items()}))
        return EXIT_OK
    print(format_symbols(k, args.name))
    return EXIT_OK


def cmd_btf(args: argparse.Namespace) -> int:
    """`vmm btf`: print a BTF type pahole-like, or a field's offset and size (--json)."""
    from .kernel import format_btf

    k, _ = _load_kernel_for_cli(args.vmlinux, None)
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


def _load_kernel_for_cli(path: str, system_map: Optional[str]) -> Any:
    """(Kernel, KernelFiles or the System.map path) for a file or directory."""
    from .kernel import Kernel
    from .kernel.locate import is_bzimage, is_elf, locate

    if os.path.isfile(path) and not is_elf(path) and not is_bzimage(path):
        return Kernel.load(system_map=path), path  # a System.map on its own
    files = locate(path, system_map=system_map)
    return files.load(), files


def cmd_kernel(args: argparse.Namespace) -> int:
    """`vmm kernel fetch|build|list|path`: the kernel store."""
    from . import kernelstore

    action = args.kernel_command
    if action == "fetch":
        art = kernelstore.fetch_debian(with_debug=args.debug)
    elif action == "build":
        art = kernelstore.build_kernel(args.version, args.fragment, force=args.force,
                                       jobs=args.jobs, source=args.source, config=args.config)
    elif action == "list":
        arts = kernelstore.list_kernels()
        _emit(args, [a.to_json() for a in arts],
              "\n".join(a.describe() for a in arts) or "no kernels cached "
              "(try: vmm kernel build 7.3, or vmm kernel fetch)")
        return EXIT_OK
    elif action == "prune":
        n = kernelstore.prune_sources()
        _emit(args, {"pruned": n}, f"pruned {n} source trees under {kernelstore.cache_root() / 'build'}")
        return EXIT_OK
    elif action == "path":
        art = kernelstore.resolve_kernel(args.spec)
        if args.field:
            value = getattr(art, args.field)
            if value is None:
                raise KernelStoreError(f"kernel {art.name} has no {args.field}")
            _emit(args, str(value), str(value))
            return EXIT_OK
    else:
        print("vmm kernel: say fetch, build, list, path or prune (see vmm kernel --help)",
              file=sys.stderr)
        return EXIT_USAGE
    _emit(args, art.to_json(), art.describe())
    return EXIT_OK


def default_kernel(kernel: Optional[str]) -> str:
    """--kernel as given, else the kernel build tree the current directory is in (as
    virtme-ng does); UsageError when there is neither."""
    if kernel is not None:
        return kernel
    from .kernel.locate import find_build_tree
    tree = find_build_tree(os.getcwd())
    if tree is None:
        raise UsageError("say which kernel: --kernel PATH|build[:VERSION]|debian "
                         "(or run vmm inside a kernel build tree)")
    return str(tree)


def machine_options(args: argparse.Namespace) -> dict:
    """The Machine keyword arguments that _add_machine_options' flags give (kernel aside)."""
    return dict(cpus=args.cpus, memory=args.memory, cmdline=args.cmdline, initrd=args.initrd,
                timeout=args.timeout, vmlinux=args.vmlinux, system_map=args.system_map,
                check_config=args.config_check,
                boot_via_decompressor=args.boot_via_decompressor,
                **console_options(args), **topology_options(args))


def topology_options(args: argparse.Namespace) -> dict:
    """--topology as a Machine keyword argument (only when given)."""
    return {"topology": args.topology} if getattr(args, "topology", None) else {}


def console_options(args: argparse.Namespace) -> dict:
    """--console-log / --console-window as Machine keyword arguments (only those given)."""
    opts = {"console_log": args.console_log, "console_window": args.console_window}
    return {k: v for k, v in opts.items() if v is not None}


def cmd_run(args: argparse.Namespace, inject: bool) -> int:
    """`vmm run` / `vmm inject`: boot (and with inject, inject the scx clock), report, return
    the exit status."""
    from .session_report import run_session

    from_snapshot = getattr(args, "from_snapshot", None)
    kernel = args.kernel if from_snapshot else default_kernel(args.kernel)
    report = run_session(
        kernel=kernel, cpus=args.cpus, memory=args.memory, cmdline=args.cmdline,
        initrd=args.initrd, timeout=args.timeout, inject_scx=inject,
        wait_for=args.wait_for, stream=None if args.quiet or args.json else sys.stdout.buffer,
        vmlinux=args.vmlinux, system_map=args.system_map, check_config=args.config_check,
        boot_via_decompressor=args.boot_via_decompressor,
        exec=getattr(args, "exec", None), include=getattr(args, "include", None),
        serve_scx_clock=getattr(args, "serve_scx_clock", False),
        monitor=getattr(args, "monitor", None), monitor_json=getattr(args, "monitor_json", None),
        scx_state=getattr(args, "scx_state", False), monitor_plot=getattr(args, "plot", None),
        from_snapshot=from_snapshot, snapshot_to=getattr(args, "directory", None),
        **console_options(args), **topology_options(args))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        sys.stdout.flush()
        print(report.describe(), file=sys.stderr)
    return report.exit_status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `vmm` command: parse argv, run the subcommand, return the exit code (see the module
    docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "cpus", 1) is not None and getattr(args, "cpus", 1) < 1:
        parser.error("--cpus must be at least 1")
    if getattr(args, "monitor", None) is not None and not args.monitor > 0:
        parser.error("--monitor takes the seconds between samples: a positive number")
    if getattr(args, "monitor_json", None) and getattr(args, "monitor", None) is None:
        parser.error("--monitor-json needs --monitor SECONDS (what to sample)")
    if getattr(args, "plot", None) and getattr(args, "monitor", None) is None:
        parser.error("--plot needs --monitor SECONDS (what to draw)")
    if getattr(args, "plot", None) and os.path.splitext(args.plot)[1].lower() not in (".png", ".svg", ".html"):
        parser.error(f"--plot {args.plot}: say .png, .svg or .html (the format follows the suffix)")
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
        if args.command == "snapshot":
            return cmd_run(args, inject=False)
        if args.command == "report":
            from .cli_report import run as cmd_report
            return cmd_report(args)
        if args.command in ("dump", "gdb"):
            from .cli_debug import run as cmd_dump
            args.kernel = default_kernel(args.kernel)
            return cmd_dump(args, machine_options(args))
    except UsageError as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except VmmError as exc:
        print(f"vmm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `vmm btf ... | head`
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:  # a missing or unreadable file: one line, no traceback
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"vmm: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
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
    b.add_argument("name", nargs="?", help="scheduler: simple, qmap, central, ... (scx_ "
                   "prefix optional)")
    b.add_argument("--all", action="store_true", help="every scheduler of the kernel's "
                   "tools/sched_ext; a table, exit 1 when any failed")
    b.add_argument("--kernel", default="build:7.3", help="store kernel spec (default build:7.3)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("-j", "--jobs", type=int, default=None)
    b.add_argument("--json", action="store_true")
    from .cli_scx import add_selftests_parser
    add_selftests_parser(ssub)  # vmm scx selftests


def cmd_scx(args: argparse.Namespace) -> int:
    """`vmm scx build NAME`: build (or find cached) a sched_ext scheduler for a kernel."""
    if args.scx_command == "selftests":
        from .cli_scx import cmd_selftests
        return cmd_selftests(args)
    from .scxbuild import build_scheduler

    if args.all == bool(args.name):
        raise UsageError("vmm scx build: name one scheduler or pass --all")
    if args.all:
        return _scx_build_all(args)
    s = build_scheduler(args.name, args.kernel, jobs=args.jobs, force=args.force)
    _emit(args, {"scheduler": s.name, "binary": str(s.binary), "kernel": s.kernel,
                 "cached": s.cached, "seconds": round(s.seconds, 1),
                 "kernel_lacks": [o for o, _ in s.lacks]}, str(s.binary))
    return EXIT_OK


def _scx_build_all(args: argparse.Namespace) -> int:
    from .scxbuild import build_all

    built, failed = build_all(args.kernel, jobs=args.jobs, force=args.force)
    rows = [{"scheduler": s.name, "ok": True, "cached": s.cached, "seconds": round(s.seconds, 1),
             "binary": str(s.binary), "kernel_lacks": [o for o, _ in s.lacks]} for s in built]
    rows += [{"scheduler": n, "ok": False, "error": str(e)} for n, e in failed.items()]
    lines = [f"{'scheduler':12} {'result':8} {'seconds':>8}  binary or error"]
    for r in rows:
        what = r["binary"] if r["ok"] else r["error"].splitlines()[0]
        result = ("cached" if r["cached"] else "built") if r["ok"] else "FAILED"
        lines.append(f"{'scx_' + r['scheduler']:12} {result:8} {r.get('seconds', 0):>8.1f}  {what}")
        if r.get("kernel_lacks"):  # built, but it would not attach on this kernel
            lines.append(f"{'':12} {'':8} {'':>8}  will not attach: the kernel lacks "
                         + ", ".join(r["kernel_lacks"]))
    lines.append(f"{len(built)} built or cached, {len(failed)} failed")
    unusable = [r["scheduler"] for r in rows if r.get("kernel_lacks")]
    if unusable:
        lines.append(f"{len(unusable)} of them will not attach on {args.kernel} "
                     "(build:7.3+scx has what they need)")
    _emit(args, {"kernel": args.kernel, "schedulers": rows}, "\n".join(lines))
    return EXIT_OK if not failed else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
