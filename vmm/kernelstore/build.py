"""Building a kernel from Debian's linux-source (or your own tree) with tinyconfig
plus the sched_ext fragment."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from vmm.errors import KernelStoreError
from vmm.hostio import atomic_copy, atomic_write
from vmm.kernel import kconfig
from vmm.kernelstore.cache import (KernelArtifacts, Progress, _quiet, _read_manifest, _stderr_progress,
                                    _store_lock, _write_manifest, cache_root)
from vmm.resources import shipped

# The package's own copy when installed, the repository's file otherwise: the cache
# key is the fragment's content, so both hit the same cached build.
DEFAULT_FRAGMENT = shipped("kernels/config/sched_ext.fragment")
# Flavours: "build:7.3+scx" is the default fragment plus what the tree's sched_ext
# schedulers need at load time (NET, FTRACE, BPF_EVENTS, MAGIC_SYSRQ). A separate kernel,
# so the everyday one stays small: those options slow a PVM boot severalfold.
FLAVOURS = {"scx": shipped("kernels/config/sched_ext-scx.fragment")}
DEFAULT_BUILD_VERSION = "7.3"

# Host tools a kernel build needs, with the Debian package that provides each.
BUILD_TOOLS = {
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "pahole": "dwarves",
    "dpkg-deb": "dpkg",
    "perl": "perl",
}


# One Kconfig parser for the store and the pre-boot config check.
parse_config = kconfig.parse


def config_mismatches(fragment: dict[str, str], config: dict[str, str]) -> list[str]:
    """Fragment options that did not end up in .config as asked (Kconfig dropped them)."""
    bad = []
    for key, want in fragment.items():
        got = config.get(key, "n")  # absent from .config means unset
        if got != want:
            bad.append(f"{key}: asked {want}, got {got}")
    return bad


def fragment_hash(fragment: Path) -> str:
    """The first 12 hex digits of the config fragment's sha256 (part of the cache key)."""
    try:
        return hashlib.sha256(fragment.read_bytes()).hexdigest()[:12]
    except OSError as e:
        raise KernelStoreError(f"cannot read config fragment {fragment}: {e}") from e


def _check_build_tools() -> None:
    missing = sorted({pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise KernelStoreError(f"kernel build needs these packages: apt-get install {' '.join(missing)}")


def _stream(cmd: list[str], cwd: Path, progress: Progress, t0: float, log: Path) -> None:
    """Run ``cmd``, showing each output line with the elapsed time; keep a log."""
    tail: list[str] = []
    with open(log, "a") as logf:
        logf.write(f"$ {' '.join(cmd)}\n")
        try:
            import subprocess  # here, not at the top: a cached kernel's lookup runs nothing

            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")  # fmt: skip
        except OSError as e:
            raise KernelStoreError(f"cannot run {cmd[0]}: {e}") from e
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            progress(f"[{time.monotonic() - t0:6.0f}s] {line}")
        rc = proc.wait()
    if rc != 0:
        raise KernelStoreError(f"{' '.join(cmd[:3])}... failed (exit {rc}) in {cwd}; log {log}:\n" + "\n".join(tail))


def build_kernel(
    version: str = DEFAULT_BUILD_VERSION,
    fragment: Path | str | None = None,
    *,
    jobs: int | None = None,
    force: bool = False,
    progress: Progress = _stderr_progress,
    source: Path | str | None = None,
    config: Path | str | None = None,
) -> KernelArtifacts:
    """Build a kernel into the store; cached.

    Default: Debian's ``linux-source-<version>`` with tinyconfig + ``fragment`` (the
    sched_ext fragment shipped with vmm), keyed ``<version>-<fragment hash>``.
    ``config``: start from that full .config instead of tinyconfig (the fragment is
    still merged on top). ``source``: the developer's own tree instead of Debian's,
    built out of tree (``make O=``) into the store so the tree itself is left alone;
    ``make`` runs every time (it is incremental), the store entry is the result.
    """
    fragment = Path(fragment) if fragment else DEFAULT_FRAGMENT
    if source is None and not re.fullmatch(r"\d+\.\d+", version):
        raise KernelStoreError(f"kernel version {version!r}: expected MAJOR.MINOR such as 7.3")
    if source is None and config is None:
        out = cache_root() / "build" / f"{version}-{fragment_hash(fragment)}"
        cached = _read_manifest(out)
        if cached and not force:
            return cached
        _check_build_tools()
        with _store_lock(progress):
            cached = _read_manifest(out)  # another process may have built it meanwhile
            if cached and not force:
                return cached
            return _build_into(out, version, fragment, jobs, force, progress)
    config_path = Path(config).expanduser() if config else None
    if config_path is not None and not config_path.is_file():
        raise KernelStoreError(f"config {config}: no such file")
    h = hashlib.sha256()
    h.update(_read_bytes(fragment, "config fragment"))
    h.update(b"\0" + (_read_bytes(config_path, "config") if config_path else b"tinyconfig"))
    if source is not None:
        tree = Path(source).expanduser().resolve()
        _check_source_tree(tree)
        h.update(b"\0" + str(tree).encode())
        out = cache_root() / "build" / f"src-{tree.name}-{h.hexdigest()[:12]}"
    else:
        tree = None
        out = cache_root() / "build" / f"{version}-{h.hexdigest()[:12]}"
        cached = _read_manifest(out)
        if cached and not force:
            return cached
    _check_build_tools()
    with _store_lock(progress):
        if tree is None:
            cached = _read_manifest(out)
            if cached and not force:
                return cached
        return _build_custom(out, version, tree, config_path, fragment, jobs, force, progress)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KernelStoreError(f"cannot read {what} {path}: {e.strerror}") from e


def _check_source_tree(tree: Path) -> None:
    if not ((tree / "Kbuild").is_file() and (tree / "Kconfig").is_file()
            and (tree / "Makefile").is_file()):
        raise KernelStoreError(f"--source {tree}: not a Linux source tree (no Kbuild, Kconfig "
                               f"and Makefile at its top)")
    if (tree / ".config").exists() or (tree / "include" / "config").is_dir():
        raise KernelStoreError(
            f"--source {tree}: the tree has an in-tree build (.config): vmm builds out of tree "
            f"(make O=) to leave your tree alone, which Kbuild refuses then. Boot your own "
            f"build instead (vmm run --kernel {tree}), or run 'make mrproper' there first")


def merge_fragment(config_text: str, fragment_text: str) -> str:
    """``config_text`` with every option the fragment names set as the fragment says
    (what scripts/kconfig/merge_config.sh -m does); olddefconfig resolves the rest."""
    frag = parse_config(fragment_text)
    kept = [line for line in config_text.splitlines()
            if not ((m := re.match(r"^(?:# )?(CONFIG_[A-Za-z0-9_]+)[= ]", line.strip()))
                    and m.group(1) in frag)]
    for key, value in frag.items():
        kept.append(f"# {key} is not set" if value == "n" else f"{key}={value}")
    return "\n".join(kept) + "\n"


def _debian_source(src_root: Path, version: str, progress: Progress, t0: float,
                   log: Path) -> tuple[Path, dict | None, bool]:
    """Debian's linux-source-VERSION, downloaded and unpacked once under ``src_root``:
    (tree, the package's provenance, whether it was fetched just now)."""
    tree = src_root / f"linux-source-{version}"
    if (tree / ".vmm-unpacked").exists():
        try:
            return tree, json.loads((tree / ".vmm-unpacked").read_text()), False
        except ValueError:
            return tree, None, False
    from vmm.kernelstore.apt import PrivateApt, _deb_members  # only to fetch: a cached build needs none

    apt = PrivateApt(cache_root(), progress)
    deb, provenance = apt.download(f"linux-source-{version}")
    progress(f"build: unpacking {deb.name}")
    tarballs = _deb_members(deb, lambda n: n.rsplit("/", 1)[-1] if re.search(r"/linux-source-[\d.]+\.tar\.\w+$", n) else None, src_root)  # noqa: E501
    if not tarballs:
        raise KernelStoreError(f"{deb.name} holds no linux-source-*.tar.* tarball")
    tarball = next(iter(tarballs.values()))
    shutil.rmtree(tree, ignore_errors=True)
    _stream(["tar", "-xf", str(tarball)], src_root, _quiet, t0, log)
    tarball.unlink()
    if not tree.is_dir():
        raise KernelStoreError(f"{tarball.name} did not unpack to {tree}")
    atomic_write(tree / ".vmm-unpacked", json.dumps(provenance) + "\n")  # last: the tree is whole
    return tree, provenance, True


def _build_custom(out: Path, version: str, tree: Path | None, config: Path | None,
                  fragment: Path, jobs: int | None, force: bool,
                  progress: Progress) -> KernelArtifacts:
    """A build from the developer's tree and/or config; output under ``out/obj``."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    provenance = None
    if tree is None:  # Debian's source, unpacked once into this entry
        tree, provenance, _ = _debian_source(out / "src", version, progress, t0, log)
    obj = out / "obj"
    obj.mkdir(exist_ok=True)
    make = ["make", "ARCH=x86_64", "-C", str(tree), f"O={obj}"]
    frag_text = fragment.read_text()
    frag_opts = parse_config(frag_text)
    stamp = obj / ".vmm-configured"
    if force or not stamp.exists():
        t = time.monotonic()
        if config is not None:
            progress(f"build: starting from {config}")
            shutil.copy(config, obj / ".config")
        else:
            _stream(make + ["tinyconfig"], tree, _quiet, t0, log)
        (obj / ".config").write_text(merge_fragment((obj / ".config").read_text(), frag_text))
        _stream(make + ["olddefconfig"], tree, _quiet, t0, log)
        atomic_write(stamp, out.name + "\n")
        progress(f"[{time.monotonic() - t0:6.0f}s] build: configure done in "
                 f"{time.monotonic() - t:.1f} s")
    mismatches = config_mismatches(frag_opts, parse_config((obj / ".config").read_text()))
    for m in mismatches:
        progress(f"build: WARNING fragment option not applied: {m}")
    t = time.monotonic()
    _stream(make + [f"-j{jobs or os.cpu_count() or 1}", "bzImage"], tree, progress, t0, log)
    built = time.monotonic() - t
    files = {"bzImage": obj / "arch" / "x86" / "boot" / "bzImage", "vmlinux": obj / "vmlinux",
             "System.map": obj / "System.map", "config": obj / ".config"}
    _publish(out, files, log)
    import subprocess

    release = subprocess.run(make + ["-s", "kernelrelease"], cwd=tree, capture_output=True,
                             text=True).stdout.strip()
    art = KernelArtifacts(name=f"build-{out.name}", version=release or version,
                          bzimage=out / "bzImage", vmlinux=out / "vmlinux",
                          system_map=out / "System.map", config=out / "config")
    _write_manifest(out, art, source="build", tree=str(tree), base_config=str(config or "tinyconfig"),
                    fragment=str(fragment.resolve()), package=provenance,
                    config_mismatches=mismatches, make_seconds=round(built, 1),
                    seconds=round(time.monotonic() - t0, 1))  # fmt: skip
    progress(f"build: {art.name} ready in {time.monotonic() - t0:.0f} s")
    return art


def _publish(out: Path, files: dict[str, Path], log: Path) -> None:
    """Copy the built files into the entry. The old manifest goes first (a rebuild, or
    force=True, must not leave it vouching for a mix of old and new files if killed
    half way); each copy is atomic; the caller writes the new manifest last."""
    for path in files.values():
        if not path.exists():
            raise KernelStoreError(f"build finished but {path} is missing; see {log}")
    (out / "manifest.json").unlink(missing_ok=True)
    for name, path in files.items():
        atomic_copy(path, out / name)


def _build_into(out: Path, version: str, fragment: Path, jobs: int | None, force: bool,
                progress: Progress) -> KernelArtifacts:  # fmt: skip
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    phases: dict[str, float] = {}

    def phase(name: str, started: float) -> None:
        phases[name] = round(time.monotonic() - started, 1)
        progress(f"[{time.monotonic() - t0:6.0f}s] build: {name} done in {phases[name]:.1f} s")

    t = time.monotonic()
    tree, provenance, fetched = _debian_source(out / "src", version, progress, t0, log)
    if fetched:
        phase("download+unpack", t)

    make = ["make", "ARCH=x86_64"]
    frag_opts = parse_config(fragment.read_text())
    if not frag_opts:
        raise KernelStoreError(f"config fragment {fragment} sets no CONFIG_ options")
    # Configure once per tree: re-running tinyconfig would touch every generated
    # config header and turn an incremental rebuild into a full one.
    configured = tree / ".vmm-configured"
    if force or not configured.exists() or configured.read_text().strip() != out.name:
        t = time.monotonic()
        _stream(make + ["tinyconfig"], tree, _quiet, t0, log)
        # merge_config.sh -m merges without running Kconfig; olddefconfig resolves deps.
        merge = ["./scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment.resolve())]
        _stream(merge, tree, _quiet, t0, log)
        _stream(make + ["olddefconfig"], tree, _quiet, t0, log)
        atomic_write(configured, out.name + "\n")
        phase("configure", t)
    mismatches = config_mismatches(frag_opts, parse_config((tree / ".config").read_text()))
    for m in mismatches:
        progress(f"build: WARNING fragment option not applied: {m}")

    t = time.monotonic()
    _stream(make + [f"-j{jobs or os.cpu_count() or 1}", "bzImage"], tree, progress, t0, log)
    phase("make bzImage", t)

    files = {
        "bzImage": tree / "arch" / "x86" / "boot" / "bzImage",
        "vmlinux": tree / "vmlinux",
        "System.map": tree / "System.map",
        "config": tree / ".config",
    }
    _publish(out, files, log)
    import subprocess

    kernelrelease = subprocess.run(make + ["-s", "--no-print-directory", "kernelrelease"], cwd=tree, capture_output=True, text=True)
    art = KernelArtifacts(
        name=f"build-{version}-{out.name.split('-', 1)[1]}",
        version=kernelrelease.stdout.strip() or version,
        bzimage=out / "bzImage",
        vmlinux=out / "vmlinux",
        system_map=out / "System.map",
        config=out / "config",
    )
    _write_manifest(out, art, source="build", fragment=str(fragment.resolve()), package=provenance,
                    config_mismatches=mismatches, phases_seconds=phases,
                    seconds=round(time.monotonic() - t0, 1))  # fmt: skip
    progress(f"build: {art.name} ready in {time.monotonic() - t0:.0f} s")
    return art


