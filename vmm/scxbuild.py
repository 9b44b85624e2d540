"""Build a sched_ext scheduler of a kernel's own tree (tools/sched_ext) for that kernel.

``vmm scx build simple --kernel build:7.3`` builds ``scx_simple`` with the kernel tree's
own Makefile: its libbpf and bpftool (built from tools/lib/bpf and tools/bpf/bpftool of
the same tree), ``vmlinux.h`` dumped by that bpftool from the kernel's own vmlinux BTF,
the BPF object compiled by clang >= 16 and the loader by the host's cc.  We drive the
kernel's Makefile rather than our own recipe because it is what sched_ext developers
use, and its flags (BPF_CFLAGS, skeleton generation) change with the tree.

Cache: ``$VMM_CACHE_DIR/scx/<kernel name>-<hash>/`` where the hash covers the sources
(tools/sched_ext, tools/lib/bpf, tools/bpf/bpftool, tools/include), the kernel's
vmlinux and the compilers' versions; ``bin/scx_<name>`` is the result, ``build/`` the
objects (O=), ``build.log`` make's output, ``manifest.json`` what was built.  The kernel
source tree is only read (its generated headers are used, nothing is written there).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import VmmError
from .hostio import atomic_copy, atomic_write
from .resources import cache_dir

MIN_CLANG = 16
# Newest first. BPF arena code (scx_qmap in Linux 7.3 keeps its queues in an arena)
# needs a compiler that casts every arena pointer it dereferences: clang 19 left one
# uncast after pointer arithmetic (qmap_dequeue) and the 7.3 verifier refused the load
# ("invalid dereference" of a scalar); clang 22 (bookworm-security) gets it right.
CLANG_CANDIDATES = ("clang-22", "clang-21", "clang-20", "clang-19", "clang-18", "clang-17",
                    "clang-16", "clang")
SOURCE_DIRS = ("tools/sched_ext", "tools/lib/bpf", "tools/bpf/bpftool", "tools/include",
               "tools/build", "tools/scripts")  # fmt: skip
RECIPE = 1  # bump when the build recipe changes


class ScxBuildError(VmmError):
    """A scheduler cannot be built (toolchain missing, no kernel source, make failed)."""


@dataclass
class Toolchain:
    clang: str
    clang_version: str
    llvm_strip: Optional[str]
    cc: str


def _version_of(tool: str) -> tuple[int, str]:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, ""
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    return (int(m.group(1)), m.group(0)) if m else (0, "")


def find_toolchain() -> Toolchain:
    """clang >= 16 (and its llvm-strip), a host C compiler, libelf and zlib headers;
    ScxBuildError naming the Debian package of what is missing."""
    clang = None
    for name in CLANG_CANDIDATES:
        path = shutil.which(name)
        if path:
            major, text = _version_of(path)
            if major >= MIN_CLANG:
                clang = (path, text, major)
                break
    if clang is None:
        raise ScxBuildError(f"building sched_ext schedulers needs clang >= {MIN_CLANG} (BPF "
                            "target): apt-get install clang-22 llvm-22")
    strip = shutil.which(f"llvm-strip-{clang[2]}") or shutil.which("llvm-strip")
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None or shutil.which("make") is None:
        raise ScxBuildError("building sched_ext schedulers needs make and a C compiler: "
                            "apt-get install make gcc")
    for header, pkg in (("libelf.h", "libelf-dev"), ("zlib.h", "zlib1g-dev")):
        if not any(Path(d, header).exists() for d in ("/usr/include", "/usr/local/include")):
            raise ScxBuildError(f"building sched_ext schedulers needs {header}: apt-get install {pkg}")
    return Toolchain(clang=clang[0], clang_version=clang[1], llvm_strip=strip, cc=cc)


def kernel_source(art) -> Path:
    """The source tree a store kernel was built from (tools/sched_ext inside it)."""
    if art.vmlinux is None:
        raise ScxBuildError(f"kernel {art.name} has no vmlinux: vmlinux.h is dumped from its BTF")
    trees = sorted(Path(art.vmlinux).parent.glob("src/linux-*"))
    trees = [t for t in trees if (t / "tools" / "sched_ext" / "Makefile").exists()]
    if not trees:
        raise ScxBuildError(
            f"kernel {art.name}: no source tree with tools/sched_ext next to {art.vmlinux} "
            "(schedulers build from the kernel's own tree: use a kernel built by "
            "`vmm kernel build`; a pruned one rebuilds with `python -m vmm.kernelstore build "
            "--force`)")
    return trees[-1]


def scheduler_names(src: Path) -> list[str]:
    """'simple', 'qmap', ...: the C schedulers of the tree's tools/sched_ext/Makefile."""
    text = (src / "tools" / "sched_ext" / "Makefile").read_text()
    m = re.search(r"^c-sched-targets\s*=\s*(.+)$", text, re.M)
    return [t.removeprefix("scx_") for t in m.group(1).split()] if m else []


def _source_hash(src: Path, vmlinux: Path, tools: Toolchain) -> str:
    h = hashlib.sha256(f"recipe {RECIPE}\n{tools.clang_version}\n".encode())
    h.update(_version_of(tools.cc)[1].encode())
    for d in SOURCE_DIRS:
        root = src / d
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath, name)
                h.update(str(p.relative_to(src)).encode() + b"\0")
                with contextlib.suppress(OSError):
                    h.update(p.read_bytes())
    with open(vmlinux, "rb") as f:  # its BTF is what vmlinux.h comes from
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _cache_root() -> Path:
    return cache_dir("scx")


@dataclass
class Scheduler:
    name: str  # "simple"
    binary: Path
    kernel: str
    directory: Path
    cached: bool
    seconds: float
    # [(CONFIG_X, why)] the kernel lacks for this scheduler to attach (it builds anyway:
    # building needs only the kernel's BTF); empty when the kernel has no .config to read
    lacks: list = field(default_factory=list)


# Which vmm.kernel.kconfig.NEEDS each scheduler of tools/sched_ext has of its kernel
# (read from 7.3's *.bpf.c): flatcg and pair call scx_bpf_task_cgroup(), qmap reads
# cpu_cgrp_id and has the cgroup ops, qmap and sdt keep their data in a BPF arena.
SCHEDULER_NEEDS = {
    "flatcg": ("scx_tree", "scx_cgroups"),
    "pair": ("scx_tree", "scx_cgroups"),
    "qmap": ("scx_tree", "scx_cgroups", "bpf_arena"),
    "sdt": ("scx_tree", "bpf_arena"),
}


def config_gaps(name: str, config_path) -> list[tuple[str, str]]:
    """[(CONFIG_X, why)] that a kernel with the .config at ``config_path`` lacks for
    ``scx_<name>`` to attach; [] when there is no config to read."""
    from .kernel.kconfig import KernelConfig

    if config_path is None or not Path(config_path).is_file():
        return []
    needs = SCHEDULER_NEEDS.get(name.removeprefix("scx_"), ("scx_tree",))
    return [(option, why) for _, option, why in KernelConfig.from_file(config_path).missing(needs)]


def describe_gaps(name: str, kernel: str, gaps) -> str:
    """The refusal's words: which options, why each, and what to boot instead."""
    return (f"scx_{name.removeprefix('scx_')} cannot attach on {kernel}: its config lacks "
            + "; ".join(f"{o} ({why})" for o, why in gaps)
            + ". Build a kernel with them: the scx flavour (build:7.3+scx, "
            "kernels/config/sched_ext-scx.fragment) has all")


def _progress_default(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_scheduler(name: str, kernel: str = "build:7.3", *, jobs: Optional[int] = None,
                    force: bool = False,
                    progress: Optional[Callable[[str], None]] = _progress_default) -> Scheduler:
    """Build ``scx_<name>`` of ``kernel``'s tree (cached); returns where the binary is."""
    from . import kernelstore

    name = name.removeprefix("scx_")
    say = progress or (lambda line: None)
    tools = find_toolchain()
    art = kernelstore.resolve_kernel(kernel)
    src = kernel_source(art)
    names = scheduler_names(src)
    if name not in names:
        raise ScxBuildError(f"scheduler {name!r} is not in {src}/tools/sched_ext: expected one of "
                            f"{', '.join(names)}")
    lacks = config_gaps(name, art.config)
    if lacks:  # it still builds (only the BTF is needed for that); booting it would not attach
        say("vmm scx: warning: " + describe_gaps(name, art.name, lacks))
    t0 = time.monotonic()
    say(f"vmm scx: hashing the sources of {art.name} (tools/sched_ext, libbpf, bpftool)")
    digest = _source_hash(src, Path(art.vmlinux), tools)
    out = _cache_root() / f"{art.name}-{digest}"
    binary = out / "bin" / f"scx_{name}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache entry at a time
        if binary.exists() and not force:
            say(f"vmm scx: cached {binary}")
            return Scheduler(name, binary, art.name, out, True, time.monotonic() - t0, lacks)
        build = out / "build"
        build.mkdir(exist_ok=True)
        cmd = make_command(src / "tools" / "sched_ext", f"O={out}", tools, art.vmlinux, jobs)
        say(f"vmm scx: building scx_{name} for {art.name} with {tools.clang_version} "
            f"(first build of this tree: libbpf and bpftool too, a few minutes)")
        log_path = out / "build.log"
        rc = make_after_vmlinux_h(cmd, out / "build" / "include" / "vmlinux.h", f"scx_{name}",
                                  src, log_path, say, t0)
        built = out / "build" / "bin" / f"scx_{name}"
        if rc != 0 or not built.exists():
            text = log_path.read_text(errors="replace")
            tail = "\n".join(text.splitlines()[-25:])
            hint = ""
            if re.search(r"struct (scx_cgroup_init_args|task_group)'|cpu_cgrp_id", text):
                hint = (f"\nscx_{name} schedules cgroups: its kernel needs CONFIG_CGROUP_SCHED=y "
                        "and CONFIG_EXT_GROUP_SCHED=y (the scx flavour, build:7.3+scx, has both; "
                        "scx_simple, scx_central and scx_cpu0 build without them)")
            raise ScxBuildError(f"building scx_{name} failed (make exit {rc}); log {log_path}:"
                                f"\n{tail}{hint}")
        binary.parent.mkdir(exist_ok=True)
        atomic_copy(built, binary)  # the binary is the entry's "complete" mark: whole or absent
        seconds = time.monotonic() - t0
        manifest = out / "manifest.json"
        data = _read_json(manifest)
        data.update({"kernel": art.name, "source": str(src), "hash": digest,
                     "clang": tools.clang_version, "vmlinux": str(art.vmlinux)})
        data.setdefault("schedulers", {})[name] = {"binary": str(binary), "seconds": round(seconds, 1)}
        atomic_write(manifest, json.dumps(data, indent=2) + "\n")
        say(f"vmm scx: built {binary} in {seconds:.1f} s")
        return Scheduler(name, binary, art.name, out, False, seconds, lacks)


def tree_schedulers(kernel: str = "build:7.3") -> list[str]:
    """The C schedulers of ``kernel``'s tree (tools/sched_ext/Makefile's targets)."""
    from . import kernelstore

    return scheduler_names(kernel_source(kernelstore.resolve_kernel(kernel)))


def build_all(kernel: str = "build:7.3", *, jobs: Optional[int] = None, force: bool = False,
              progress: Optional[Callable[[str], None]] = _progress_default
              ) -> tuple[list[Scheduler], dict[str, ScxBuildError]]:
    """Every scheduler of ``kernel``'s tree (``vmm scx build --all``): the ones built (or
    cached) and, by name, why each other one failed; one failure does not stop the rest."""
    built, failed = [], {}
    for name in tree_schedulers(kernel):
        try:
            built.append(build_scheduler(name, kernel, jobs=jobs, force=force, progress=progress))
        except ScxBuildError as e:
            failed[name] = e
    return built, failed


def make_command(directory: Path, output: str, tools: Toolchain, vmlinux, jobs) -> list[str]:
    """make in one of the kernel tree's BPF tool directories (tools/sched_ext, its
    selftests) with our clang and the kernel's own BTF; `output` is its O=/OUTPUT= word."""
    cmd = ["make", "-C", str(directory), output, f"-j{jobs or os.cpu_count() or 1}",
           f"CLANG={tools.clang}", f"VMLINUX_BTF={Path(vmlinux).resolve()}"]
    if tools.llvm_strip:
        cmd.append(f"LLVM_STRIP={tools.llvm_strip}")
    return cmd


def make_after_vmlinux_h(cmd: list[str], vmlinux_h: Path, target: str, src: Path,
                         log_path: Path, say: Callable[[str], None], t0: float) -> int:
    """First vmlinux.h (and the bpftool that dumps it; completed with the ops our
    kernel's BTF lacks), then `target`; make's exit status, its output in `log_path`."""
    _drop_truncated_header(vmlinux_h)
    with open(log_path, "w") as log:
        rc = _make(cmd + [str(vmlinux_h)], log, say, t0)
        if rc == 0:
            _complete_ops(vmlinux_h, src, say)
            rc = _make(cmd + [target], log, say, t0)
    return rc


def _drop_truncated_header(vmlinux_h: Path) -> None:
    """Remove a vmlinux.h that bpftool did not finish (killed mid-dump: no closing
    ``#endif``): make would take it as up to date and every later build would fail."""
    try:
        with open(vmlinux_h, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256))
            tail = f.read()
    except OSError:
        return
    if b"#endif" not in tail:
        vmlinux_h.unlink(missing_ok=True)


def _read_json(path: Path) -> dict:
    """The manifest's data; {} when absent or unreadable (never fatal: it is a record)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _make(cmd: list[str], log, say: Callable[[str], None], t0: float) -> int:
    """Run make, logging everything and reporting its steps as progress."""
    log.write(" ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    steps = 0
    for line in proc.stdout:
        log.write(line)
        # make's quiet lines: "  CC  file", "  CLNG-BPF  x.bpf.o", "  GEN-SKEL  x.skel.h"
        m = re.match(r"\s*([A-Z][A-Z_-]+)\s+(\S+)", line)
        if not m:
            continue
        steps += 1
        if m.group(1) in ("CLNG-BPF", "GEN-SKEL", "GEN", "LINK", "INSTALL") or steps % 25 == 0:
            say(f"vmm scx: [{time.monotonic() - t0:6.1f}s] step {steps}: {m.group(1)} "
                f"{Path(m.group(2)).name}")
    return proc.wait()


def _complete_ops(vmlinux_h: Path, src: Path, say: Callable[[str], None]) -> None:
    """Declare in vmlinux.h's struct sched_ext_ops the callbacks that the tree's
    include/scx/compat.h names but this kernel's BTF lacks.

    A kernel without CONFIG_EXT_GROUP_SCHED (ours: no cgroup scheduling) has no
    ops.cgroup_* members, yet compat.h's SCX_OPS_OPEN() tests and clears
    ``cgroup_set_bandwidth`` / ``cgroup_set_idle`` unconditionally, so the loader does
    not compile.  Declared here, they stay NULL in the skeleton, and libbpf skips NULL
    struct_ops members that the kernel does not have (tools/lib/bpf/libbpf.c,
    bpf_map__init_kern_struct_ops), so the unmodified sources build and load."""
    text = vmlinux_h.read_text()
    m = re.search(r"^struct sched_ext_ops \{\n(.*?)^\};", text, re.M | re.S)
    if m is None:
        raise ScxBuildError(f"{vmlinux_h}: no struct sched_ext_ops: is CONFIG_SCHED_CLASS_EXT on?")
    compat = (src / "tools" / "sched_ext" / "include" / "scx" / "compat.h").read_text()
    named = sorted(set(re.findall(r"struct_ops\.__ops_name->(\w+)", compat)))
    missing = [n for n in named if not re.search(rf"\b{n}\b", m.group(1))]
    if not missing:
        return
    say(f"vmm scx: this kernel's sched_ext_ops lacks {', '.join(missing)} (named by compat.h): "
        "declared in vmlinux.h, left NULL")
    extra = "".join(f"\tvoid (*{n})(void);\t/* vmm: absent from this kernel */\n" for n in missing)
    # Atomic: make takes an existing vmlinux.h as up to date, so a half-written one
    # (a kill mid-write) would break every later build of this entry.
    atomic_write(vmlinux_h, text[:m.end(1)] + extra + text[m.end(1):])
