"""The kernel's own sched_ext selftests (tools/testing/selftests/sched_ext): build the
tree's ``runner`` for a store kernel, the guest job that runs it, and its results.

``vmm scx selftests --kernel build:7.3+scx`` (vmm/cli_scx.py boots and runs it) builds the
runner with the tree's own Makefile (its libbpf and bpftool, ``vmlinux.h`` from the
kernel's BTF, clang for the BPF programs), as the BPF CI does, cached like the schedulers
(vmm/scxbuild.py): ``$VMM_CACHE_DIR/scx-selftests/<kernel name>-<hash>/bin/runner``,
the hash covering the selftests' sources, libbpf/bpftool/tools headers, the kernel's
vmlinux and the compilers' versions.  The kernel tree is only read.

The runner prints, per test (runner.c, print_test_preamble / print_test_result)::

    ===== START =====
    TEST: <name>
    DESCRIPTION: <text>
    OUTPUT:
    <the test's own lines>
    ok <n> <name> #            (pass)     ok <n> <name> # SKIP   (skip)
    not ok <n> <name> #        (fail)
    =====  END  =====

then a RESULTS summary.  Its exit status says only whether some test failed, so the
per-test lines are what counts.  The guest job prefixes every line the runner writes
with the guest's uptime (``@<seconds> <line>``) so each test's duration is the time
from its START to the next test's START (the runner flushes stdout at each preamble).
A test that never printed its result line (the guest crashed or hung) is ``crash`` or
``timeout``, with the guest's last console lines as its output; the caller boots again
and goes on with the tests after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .hostio import atomic_copy, atomic_write
from .machine.guestjob import LOG_PREFIX
from .resources import cache_dir
from .scxbuild import (SOURCE_DIRS, ScxBuildError, Toolchain, _progress_default, _version_of,
                       find_toolchain, kernel_source, make_after_vmlinux_h, make_command)

SELFTESTS = "tools/testing/selftests/sched_ext"
HASHED = SOURCE_DIRS + (SELFTESTS, "tools/testing/selftests/lib.mk")
RECIPE = 1  # bump when the build recipe changes
RUNNER_IN_GUEST = "/bin/runner"
# The kernel's .config, put where libbpf looks (/boot/config-$(uname -r)) by the job:
# common.bpf.h's __kconfig externs need it (without: "libbpf: failed to open system
# Kconfig" and dsp_local_on fails to load; our builds have no CONFIG_IKCONFIG_PROC)
KCONFIG_IN_GUEST = "/etc/vmm-kconfig"
MAX_OUTPUT_LINES = 200  # per test kept from the guest (a chatty test stays bounded)
MAX_LINE = 2000  # characters of one line kept

STATUSES = ("pass", "fail", "skip", "crash", "timeout", "not run")


class SelftestsError(ScxBuildError):
    """The selftests cannot be built or run (no selftests in the tree, toolchain, make)."""


@dataclass
class Runner:
    binary: Path
    kernel: str
    directory: Path
    cached: bool
    seconds: float
    tests: list[str]  # the runner's own list (`runner -l`), in its order
    config: Optional[Path] = None  # the kernel's .config (None: the store has none)

    def includes(self) -> list[str]:
        """The job's --include list: the runner, and the kernel's .config for libbpf."""
        return [f"{self.binary}:{RUNNER_IN_GUEST}"] + (
            [f"{self.config}:{KCONFIG_IN_GUEST}"] if self.config else [])


@dataclass
class TestResult:
    name: str
    status: str  # one of STATUSES
    seconds: Optional[float] = None
    output: list[str] = field(default_factory=list)  # the test's own lines (and the kernel's)
    known: bool = False  # listed in the known-failures file

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "crash", "timeout")


# --- build --------------------------------------------------------------------------------
def selftests_source(src: Path) -> Path:
    d = src / SELFTESTS
    if not (d / "runner.c").exists() or not (d / "Makefile").exists():
        raise SelftestsError(f"{src} has no {SELFTESTS} (runner.c, Makefile): the sched_ext "
                             "selftests came with Linux 6.12; use a kernel tree that has them")
    return d


def _check_libs() -> None:
    """What the runner links beyond the schedulers' needs (-lzstd): the package to install."""
    if not any(Path(d, "zstd.h").exists() for d in ("/usr/include", "/usr/local/include")):
        raise SelftestsError("the sched_ext selftests runner links libzstd: "
                             "apt-get install libzstd-dev")


def _source_hash(src: Path, vmlinux: Path, tools: Toolchain) -> str:
    h = hashlib.sha256(f"selftests recipe {RECIPE}\n{tools.clang_version}\n".encode())
    h.update(_version_of(tools.cc)[1].encode())
    for d in HASHED:
        root = src / d
        paths = [root] if root.is_file() else sorted(
            Path(dp, n) for dp, dns, ns in os.walk(root) for n in ns)
        for p in paths:
            h.update(str(p.relative_to(src)).encode() + b"\0")
            with contextlib.suppress(OSError):
                h.update(p.read_bytes())
    with open(vmlinux, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def list_tests(binary: Path) -> list[str]:
    """The runner's tests in its order (``runner -l`` runs on the host: it loads nothing)."""
    try:
        out = subprocess.run([str(binary), "-l"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SelftestsError(f"{binary} -l did not run: {exc}") from exc
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names:
        raise SelftestsError(f"{binary} -l listed no tests (exit {out.returncode}): {out.stderr[-500:]}")
    return names


def build_runner(kernel: str = "build:7.3+scx", *, jobs: Optional[int] = None, force: bool = False,
                 progress: Optional[Callable[[str], None]] = _progress_default) -> Runner:
    """Build (or find cached) the sched_ext selftests ``runner`` of ``kernel``'s tree."""
    from . import kernelstore

    say = progress or (lambda line: None)
    tools = find_toolchain()
    _check_libs()
    art = kernelstore.resolve_kernel(kernel)
    src = kernel_source(art)
    tests_src = selftests_source(src)
    t0 = time.monotonic()
    say(f"vmm scx: hashing the sources of {art.name} (selftests, libbpf, bpftool)")
    digest = _source_hash(src, Path(art.vmlinux), tools)
    out = cache_dir("scx-selftests") / f"{art.name}-{digest}"
    config = Path(art.config) if art.config and Path(art.config).is_file() else None
    binary = out / "bin" / "runner"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache entry at a time
        if binary.exists() and not force:
            say(f"vmm scx: cached {binary}")
            return Runner(binary, art.name, out, True, time.monotonic() - t0, list_tests(binary),
                          config)
        build = out / "build"
        build.mkdir(exist_ok=True)
        cmd = make_command(tests_src, f"OUTPUT={build}", tools, art.vmlinux, jobs)
        say(f"vmm scx: building the sched_ext selftests runner for {art.name} with "
            f"{tools.clang_version} (libbpf, bpftool and ~35 BPF programs: about a minute)")
        log_path = out / "build.log"
        rc = make_after_vmlinux_h(cmd, build / "build" / "include" / "vmlinux.h",
                                  str(build / "runner"), src, log_path, say, t0)
        built = build / "runner"
        if rc != 0 or not built.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            raise SelftestsError(f"building the sched_ext selftests runner failed (make exit {rc}); "
                                 f"log {log_path}:\n{tail}")
        binary.parent.mkdir(exist_ok=True)
        atomic_copy(built, binary)  # the entry's "complete" mark: whole or absent
        seconds = time.monotonic() - t0
        tests = list_tests(binary)
        atomic_write(out / "manifest.json", json.dumps(
            {"kernel": art.name, "source": str(src), "hash": digest, "clang": tools.clang_version,
             "vmlinux": str(art.vmlinux), "runner": str(binary), "tests": tests,
             "seconds": round(seconds, 1)}, indent=2) + "\n")
        say(f"vmm scx: built {binary} ({len(tests)} tests) in {seconds:.1f} s")
        return Runner(binary, art.name, out, False, seconds, tests, config)


# --- the guest job ------------------------------------------------------------------------
def patterns_of(pattern: Optional[str]) -> list[str]:
    """``"a,b"``: the runner's ``-t`` patterns, one run each (an empty one is refused)."""
    if pattern is None:
        return []
    parts = [p.strip() for p in pattern.split(",")]
    if not all(parts):
        raise SelftestsError(f"filter {pattern!r}: give test-name substrings separated by "
                             "commas, none empty (e.g. 'minimal,select_cpu')")
    return parts


def select(tests: Sequence[str], pattern: Optional[str]) -> list[str]:
    """The tests the runner's ``-t PATTERN`` runs (a substring of the name; with
    ``"a,b"``, those that contain one of them)."""
    parts = patterns_of(pattern)
    return [t for t in tests if not parts or any(p in t for p in parts)]


def guest_command(only: Optional[Sequence[str]] = None, pattern: Optional[str] = None, *,
                  quiet_kernel: bool = True) -> str:
    """The job's shell command: the runner (all, ``-t pattern`` for each of the
    comma-separated ``pattern``, or each of ``only`` in turn, after a crash), every line
    stamped with the guest's uptime.

    ``quiet_kernel``: the kernel's console log level goes to 1 first.  Its messages
    (sched_ext's "enabled"/"disabled" of every test) otherwise land on the same serial
    console in the middle of the runner's lines (one lane run read "TEST: enq" +
    "sched_ext: ..." for enq_select_cpu); an oops or panic still prints (the kernel
    raises the level itself then).  Off only where the command runs outside a guest
    (the level is the whole kernel's)."""
    if only is None and pattern is not None and "," in pattern:
        only = patterns_of(pattern)
    if only is not None:
        # -t is a substring match: "-t select_cpu_dfl" also runs select_cpu_dfl_nodispatch
        picked = [t for i, t in enumerate(only) if not any(o in t for o in only[:i])]
        run = " ".join(f"{RUNNER_IN_GUEST} -t {shlex.quote(t)};" for t in picked)
    else:
        run = RUNNER_IN_GUEST + (f" -t {shlex.quote(pattern)}" if pattern else "") + ";"
    # total_bw reads /sys/kernel/debug/sched (it skips without CONFIG_DEBUG_FS)
    return ("cd /tmp\n"
            + ("echo 1 > /proc/sys/kernel/printk\n" if quiet_kernel else "")
            + "mount -t debugfs none /sys/kernel/debug 2>/dev/null\n"
            f"if [ -e {KCONFIG_IN_GUEST} ]; then mkdir -p /boot; read rel _ </proc/sys/kernel/osrelease; "
            f"cat {KCONFIG_IN_GUEST} > /boot/config-$rel; fi\n"
            f"( {run} echo \"vmm-selftests: runner exit $?\" ) </dev/null 2>&1 |\n"
            "  while IFS= read -r l; do read up _ </proc/uptime; echo \"@$up $l\"; done\n")


# --- the results --------------------------------------------------------------------------
_STAMP = re.compile(r"^" + LOG_PREFIX + r"@(\d+(?:\.\d+)?) (.*)$")
_RESULT = re.compile(r"^(ok|not ok) \d+ (\S+) #\s*(SKIP)?")


def parse_output(text: str, expected: Sequence[str] = ()) -> tuple[list[TestResult], bool]:
    """Per-test results from the job's console text, and whether the runner finished
    (its ``vmm-selftests: runner exit`` line).  Lines without the uptime stamp are the
    kernel's (or the init's); those printed during a test join its output.  A test that
    started and has no result is ``crash`` (the caller may make it ``timeout``); each of
    ``expected`` never started is ``not run``.  The first result of a name counts."""
    results: dict[str, TestResult] = {}
    current: Optional[TestResult] = None
    started_at = 0.0
    last_stamp = None
    finished = False
    in_output = False

    def close(at: Optional[float]) -> None:
        nonlocal current
        if current is not None and at is not None and current.seconds is None:
            current.seconds = round(max(0.0, at - started_at), 2)
        current = None

    for raw in text.splitlines():
        raw = raw.rstrip("\r")
        m = _STAMP.match(raw)
        if not m:
            if current is not None and in_output and raw.strip() and not raw.startswith("vmm-job:"):
                _keep(current, raw)
            continue
        stamp, line = float(m.group(1)), m.group(2)
        last_stamp = stamp
        if line.startswith("vmm-selftests: runner exit"):
            finished = True
            continue
        if line == "===== START =====":
            close(stamp)  # the previous test ends where this one starts
            in_output = False
            continue
        if line.startswith("TEST: "):
            name = line[6:].strip()
            current = TestResult(name, "crash")
            started_at = stamp
            if name not in results:
                results[name] = current
            continue
        if current is None:
            continue
        if line == "OUTPUT:":
            in_output = True
            continue
        r = _RESULT.match(line)
        if r and r.group(2) == current.name:
            current.status = "skip" if r.group(3) else ("pass" if r.group(1) == "ok" else "fail")
            in_output = False
            continue
        if line == "=====  END  =====":
            in_output = False
            continue
        if line.startswith("DESCRIPTION: ") and not in_output:
            continue
        if in_output:
            _keep(current, line)
    if finished:  # the last test ends where the runner did
        close(last_stamp)
    for name in expected:
        results.setdefault(name, TestResult(name, "not run"))
    order = {n: i for i, n in enumerate(expected)}
    return sorted(results.values(), key=lambda r: order.get(r.name, len(order))), finished


def _keep(result: TestResult, line: str) -> None:
    if len(result.output) < MAX_OUTPUT_LINES:
        result.output.append(line[:MAX_LINE])
    elif len(result.output) == MAX_OUTPUT_LINES:
        result.output.append("... (more lines dropped)")


def read_known_failures(path: Optional[str | Path]) -> set[str]:
    """Test names, one a line; '#' starts a comment.  Nothing is silenced by default."""
    if path is None:
        return set()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SelftestsError(f"known-failures file {path}: {exc.strerror}: give a file of "
                             "test names, one a line") from exc
    return {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}


def apply_known(results: Iterable[TestResult], known: set[str]) -> list[str]:
    """Mark known failures; the names in ``known`` that no result has (a typo, or a test
    the tree no longer has), for the caller to warn about."""
    results = list(results)
    for r in results:
        r.known = r.failed and r.name in known
    names = {r.name for r in results}
    return sorted(known - names)


def unexpected_failures(results: Iterable[TestResult]) -> list[TestResult]:
    return [r for r in results if r.failed and not r.known]


def counts(results: Iterable[TestResult]) -> dict[str, int]:
    c = {s: 0 for s in STATUSES}
    for r in results:
        c[r.status] += 1
    return c


def format_table(results: Sequence[TestResult], *, output_lines: int = 12) -> str:
    """The table: test, result, seconds; under each failure its own last lines."""
    width = max([len(r.name) for r in results] + [4])
    lines = [f"{'test':<{width}}  {'result':<13}  seconds"]
    for r in results:
        status = r.status + (" (known)" if r.known else "")
        secs = f"{r.seconds:7.2f}" if r.seconds is not None else "      -"
        lines.append(f"{r.name:<{width}}  {status:<13}  {secs}")
        if r.failed:
            shown = r.output[-output_lines:]
            if len(r.output) > len(shown):
                lines.append(f"    ... {len(r.output) - len(shown)} earlier lines")
            lines += [f"    | {line}" for line in shown] or ["    | (the test printed nothing)"]
    c = counts(results)
    lines.append(", ".join(f"{n} {s}" for s, n in c.items() if n) + f" of {len(results)}")
    return "\n".join(lines)


def to_json(results: Sequence[TestResult]) -> list[dict]:
    return [asdict(r) for r in results]
