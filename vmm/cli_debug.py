"""`vmm dump`: boot a kernel, wait for a console line, write an ELF vmcore, stop.

    vmm dump vmcore --kernel build:7.3 --cpus 2            # after 'Run /init'
    vmm dump vmcore --kernel build:7.3 --on-panic          # run until the guest ends;
                                                           # a panic writes the vmcore
    crash -s ~/.cache/vmm/kernels/build/7.3-*/vmlinux vmcore ;  drgn -c vmcore -s vmlinux

And `vmm gdb`. Part of the command line (vmm/cli.py builds on it): it drives the session
(vmm.Machine), which uses the debug tools of vmm/debug/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable


def add_parser(sub: Any, add_machine_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("dump", help="boot, then write an ELF vmcore that drgn and crash open")
    p.add_argument("output", help="vmcore file to write")
    add_machine_options(p)
    p.add_argument("--wait-for", default=None,
                   help="console regex to wait for before dumping "
                        "(default: 'Run /init as init process' for real Linux)")
    p.add_argument("--after", type=float, default=0.0,
                   help="seconds to let the guest run after the marker before dumping")
    p.add_argument("--on-panic", action="store_true",
                   help="run until the guest ends; dump only if it panics")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="do not stream the console")

    g = sub.add_parser("gdb", help="boot, then serve gdb's remote protocol (target remote)")
    add_machine_options(g)
    g.add_argument("--port", type=int, default=1234, help="TCP port on 127.0.0.1 (default 1234)")
    g.add_argument("--wait-for", default=None,
                   help="console regex to wait for before serving (default: 'Run /init ...')")
    g.add_argument("--quiet", action="store_true", help="do not stream the console")


def run(args: argparse.Namespace, options: dict) -> int:
    """``vmm dump`` / ``vmm gdb``; ``options`` are the Machine keywords of the shared
    machine flags (vmm.cli.machine_options)."""
    from vmm.errors import VmmError
    from vmm.session import INIT_MARKER, Machine

    if args.command == "gdb":
        return run_gdb(args, options)

    stream = None if args.quiet or args.json else sys.stdout.buffer
    m = Machine(args.kernel, console=stream, **options)
    result: dict = {"output": args.output}
    try:
        if args.on_panic:
            m.dump_on_panic = args.output
            m.start()
            end = m.wait()
            result["exit"] = {"reason": end.reason, "detail": end.detail}
            result["vmcore"] = m.core_path
            status = 0 if m.core_path else 1
        else:
            m.start()
            marker = args.wait_for or (INIT_MARKER if m.is_linux else r"cpus up")
            m.wait_for_console(marker, timeout=args.timeout)
            time.sleep(args.after)
            report = m.dump_core(args.output)
            result.update(vmcore=report.path, size=report.size, ram_bytes=report.ram_bytes,
                          hole_bytes=report.hole_bytes, cpus=report.cpus,
                          describe=report.describe())
            status = 0
    except VmmError as exc:
        result["error"] = str(exc)
        status = 1
    finally:
        end = m.stop()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        sys.stdout.flush()
        for k in ("describe", "error"):
            if k in result:
                print(f"vmm: {result[k]}", file=sys.stderr)
        print(f"vmm: {end}", file=sys.stderr)
    return status


def run_gdb(args: argparse.Namespace, options: dict) -> int:
    from vmm.session import INIT_MARKER, Machine

    m = Machine(args.kernel, console=None if args.quiet else sys.stdout.buffer, **options)
    m.start()
    try:
        m.wait_for_console(args.wait_for or (INIT_MARKER if m.is_linux else r"cpus up"),
                           timeout=args.timeout)
        stub = m.gdb_server(port=args.port)
        vmlinux = m._vmlinux_path or args.kernel
        # gdb cannot learn the KASLR slide over the remote protocol: load the symbols
        # at the slide vmm knows (0 with nokaslr). Breakpoints, stepi, hbreak, watch work.
        load = stub.symbol_file_command(str(vmlinux))
        print(f"vmm: gdb stub on 127.0.0.1:{stub.port}: gdb -ex '{load}' -ex 'target remote "
              f":{stub.port}' (Ctrl-C here stops the VM)", file=sys.stderr, flush=True)
        end = m.wait()
    except KeyboardInterrupt:
        end = m.stop()
    finally:
        m.stop()
    print(f"vmm: {end}", file=sys.stderr)
    # The VM's own status, as `vmm run` returns it (README "Exit codes"): the guest's
    # exit port code, 255 for a panic, crash or timeout, 0 when stopped here (Ctrl-C).
    return end.exit_code if end is not None else 0
