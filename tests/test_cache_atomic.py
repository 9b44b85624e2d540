"""Every cache writer, killed mid-write: the next run rebuilds instead of trusting half
an entry, and the dead writer's temporary is swept.

Each case runs the real writer in a child process (VMM_CACHE_DIR private) that SIGKILLs
itself in the middle of a write: vmm.hostio.atomic_output is wrapped so that its N-th
write() puts half the bytes in the file, flushes, and kills the process; nothing runs
after that (no finally, no atexit), as with a kill from outside. Small synthetic entries:
no kernel is built or downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmm import hostio

PRELUDE = textwrap.dedent("""\
    import contextlib, os, signal, sys
    import vmm.hostio as h
    KILL_AT = int(sys.argv[1])
    _orig = h.atomic_output
    _writes = [0]

    class _Dying:
        def __init__(self, f):
            self.f = f
        def write(self, b):
            _writes[0] += 1
            if _writes[0] == KILL_AT:
                self.f.write(bytes(b)[: max(1, len(b) // 2)])
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return self.f.write(b)
        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextlib.contextmanager
    def _dying(path, **kw):
        with _orig(path, **kw) as f:
            yield _Dying(f)

    h.atomic_output = _dying
""")


def run_killed(code: str, cache: Path, kill_at: int = 1) -> None:
    """Run ``code`` after PRELUDE in a child; it must die of SIGKILL mid-write."""
    env = dict(os.environ, VMM_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), str(kill_at)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def temps(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if hostio.is_temp_name(n))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("VMM_CACHE_DIR", str(root))
    return root


def test_symbol_cache_entry_killed_mid_write_is_a_miss(cache):
    from vmm.kernel import cache as symcache

    run_killed("""
        from vmm.kernel import cache
        cache.store("symtab-sha256-k", list(range(200000)))
    """, cache)
    directory = cache / "introspection"
    assert not symcache.entry_path("symtab-sha256-k").exists()
    assert len(temps(directory)) == 1  # the half-written temporary, under its own name
    assert symcache.load("symtab-sha256-k") is None
    computed = []
    value = symcache.cached("symtab-sha256-k", lambda: computed.append(1) or [1, 2, 3])
    assert value == [1, 2, 3] and computed == [1]  # recomputed, not trusted
    assert symcache.load("symtab-sha256-k") == [1, 2, 3]
    assert os.listdir(directory) == ["symtab-sha256-k.pickle"]  # the dead writer's temp swept


def _entry(out: Path, tag: str) -> dict[str, Path]:
    obj = out.parent / f"obj-{tag}"
    obj.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("bzImage", "vmlinux", "System.map", "config"):
        files[name] = obj / name
        files[name].write_bytes(f"{tag} {name}\n".encode() * 1000)
    return files


@pytest.mark.parametrize("kill_at", [2, 5], ids=["mid-artifacts", "mid-manifest"])
def test_kernel_store_rebuild_killed_mid_publish_is_rebuilt(cache, monkeypatch, kill_at):
    """A forced rebuild of a complete entry killed while copying its files (or while
    writing the manifest): the old manifest is not left vouching for a mix of old and
    new files, so build_kernel builds again."""
    from vmm.kernelstore import build, cache as store

    out = store.cache_root() / "build" / f"7.3-{build.fragment_hash(build.DEFAULT_FRAGMENT)}"
    out.mkdir(parents=True)
    old = _entry(out, "old")
    build._publish(out, old, out / "build.log")
    art = store.KernelArtifacts("build-7.3-x", "7.3.0", out / "bzImage", out / "vmlinux",
                                out / "System.map", out / "config")
    store._write_manifest(out, art, source="build")
    assert store._read_manifest(out) == art and len(store.list_kernels()) == 1
    new = _entry(out, "new")
    run_killed(f"""
        from pathlib import Path
        from vmm.kernelstore import build, cache
        out = Path({str(out)!r})
        files = {{k: Path(v) for k, v in {json.dumps({k: str(v) for k, v in new.items()})}.items()}}
        build._publish(out, files, out / "build.log")
        art = cache.KernelArtifacts("build-7.3-x", "7.3.1", out / "bzImage", out / "vmlinux",
                                    out / "System.map", out / "config")
        cache._write_manifest(out, art, source="build")
    """, cache, kill_at)
    assert store._read_manifest(out) is None  # incomplete: not a cached kernel
    assert store.list_kernels() == []
    for name in ("bzImage", "vmlinux", "System.map", "config"):  # each file whole, old or new
        assert (out / name).read_bytes() in (old[name].read_bytes(), new[name].read_bytes())
    rebuilt = []
    monkeypatch.setattr(build, "_check_build_tools", lambda: None)
    monkeypatch.setattr(build, "_build_into", lambda *a, **k: rebuilt.append(a) or "rebuilt")
    assert build.build_kernel("7.3", progress=lambda line: None) == "rebuilt"
    assert rebuilt


def test_kernel_store_manifest_is_written_whole(cache):
    from vmm.kernelstore import cache as store

    out = cache / "kernels" / "debian" / "abi"
    out.mkdir(parents=True)
    (out / "vmlinuz").write_bytes(b"k")
    art = store.KernelArtifacts("debian-abi", "7.3", out / "vmlinuz", None, None, None)
    run_killed(f"""
        from pathlib import Path
        from vmm.kernelstore import cache
        out = Path({str(out)!r})
        art = cache.KernelArtifacts("debian-abi", "7.3", out / "vmlinuz", None, None, None)
        cache._write_manifest(out, art, source="debian")
    """, cache)
    assert not (out / "manifest.json").exists() and store._read_manifest(out) is None
    store._write_manifest(out, art, source="debian")
    assert store._read_manifest(out) == art
    assert temps(out) == []


@pytest.mark.skipif(not Path("/usr/bin/dpkg-deb").exists(), reason="needs dpkg-deb")
def test_deb_member_killed_mid_extract_is_not_kept(cache, tmp_path):
    """_deb_members streams a member 1 MiB at a time: killed after the first MiB, the
    member is absent under its name; the next extraction writes it whole."""
    from vmm.kernelstore.apt import _deb_members

    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: vmm-test\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    (pkg / "boot").mkdir()
    payload = os.urandom(3 << 20)
    (pkg / "boot" / "vmlinuz-1").write_bytes(payload)
    deb = tmp_path / "t.deb"
    subprocess.run(["dpkg-deb", "-Znone", "--build", str(pkg), str(deb)], check=True,
                   capture_output=True)
    dest = tmp_path / "dest"
    run_killed(f"""
        from pathlib import Path
        from vmm.kernelstore.apt import _deb_members
        _deb_members(Path({str(deb)!r}), lambda n: "vmlinuz" if "/vmlinuz" in n else None,
                     Path({str(dest)!r}))
    """, cache, kill_at=2)
    assert not (dest / "vmlinuz").exists()
    assert len(temps(dest)) == 1
    found = _deb_members(deb, lambda n: "vmlinuz" if "/vmlinuz" in n else None, dest)
    assert found["vmlinuz"].read_bytes() == payload
    assert os.listdir(dest) == ["vmlinuz"]


def test_initramfs_killed_mid_write_is_rebuilt(cache):
    from vmm.machine.initramfs import build_initramfs, parse_newc

    build_initramfs("spin")  # compiles the init once (cached), so the child only writes
    for p in (cache / "initramfs").glob("spin-*"):
        p.unlink()
    run_killed("""
        from vmm.machine.initramfs import build_initramfs
        build_initramfs("spin")
    """, cache)
    directory = cache / "initramfs"
    assert not list(directory.glob("spin-*"))
    assert len(temps(directory)) == 1
    image = build_initramfs("spin")
    names = [e.path for e in parse_newc(gzip.decompress(image.read_bytes()))]
    assert "init" in names
    assert temps(directory) == []


def test_scx_manifest_and_header_survive_a_kill(tmp_path, cache):
    from vmm import scxbuild

    # An unreadable manifest (an older vmm's half-written one) is a record, not fatal.
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"kernel": "build-7')
    assert scxbuild._read_json(manifest) == {}
    # A vmlinux.h that bpftool did not finish is removed, so make writes it again.
    h = tmp_path / "vmlinux.h"
    h.write_text("#ifndef __VMLINUX_H__\nstruct x {\n\tint a;\n")
    scxbuild._drop_truncated_header(h)
    assert not h.exists()
    whole = "#ifndef __VMLINUX_H__\nstruct sched_ext_ops {\n\tint a;\n};\n#endif /* __VMLINUX_H__ */\n"
    h.write_text(whole)
    scxbuild._drop_truncated_header(h)
    assert h.read_text() == whole
    # _complete_ops killed while rewriting vmlinux.h leaves the previous, whole header.
    src = tmp_path / "src"
    compat = src / "tools" / "sched_ext" / "include" / "scx" / "compat.h"
    compat.parent.mkdir(parents=True)
    compat.write_text("x = struct_ops.__ops_name->cgroup_set_idle;\n")
    run_killed(f"""
        from pathlib import Path
        from vmm import scxbuild
        scxbuild._complete_ops(Path({str(h)!r}), Path({str(src)!r}), lambda line: None)
    """, cache)
    assert h.read_text() == whole
    scxbuild._complete_ops(h, src, lambda line: None)
    assert "cgroup_set_idle" in h.read_text() and temps(tmp_path) == []


def test_vmcore_killed_mid_write_leaves_no_core_and_a_private_temp(tmp_path, cache):
    out = tmp_path / "cores" / "vmcore"
    out.parent.mkdir()
    old = os.umask(0o022)
    try:
        run_killed(f"""
            from vmm.debug import vmcore
            class Ram:
                def read(self, gpa, n):
                    return b"\\x22" * n
            segs = vmcore.ram_segments([(0, 1 << 20)], 0xFFFF888000000000)
            vmcore.write({str(out)!r}, Ram(), segs,
                         [vmcore.PrStatus(0, {{n: 0 for n in vmcore.GREGS}})], b"", chunk=65536)
        """, cache, kill_at=4)
    finally:
        os.umask(old)
    assert not out.exists()
    (tmp,) = temps(out.parent)
    assert stat.S_IMODE(os.stat(out.parent / tmp).st_mode) == 0o600  # guest memory, even half

    from vmm.debug import vmcore

    class Ram:
        def read(self, gpa, n):
            return b"\x22" * n

    vmcore.write(str(out), Ram(), vmcore.ram_segments([(0, 8192)], 0xFFFF888000000000),
                 [vmcore.PrStatus(0, {n: 0 for n in vmcore.GREGS})], b"")
    assert os.listdir(out.parent) == ["vmcore"]


def test_store_lock_of_a_killed_process_is_free(cache):
    """The kernel store's lock (flock) goes with the process that held it."""
    import fcntl

    from vmm.kernelstore import cache as store

    env = dict(os.environ, VMM_CACHE_DIR=str(cache))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""\
        import sys, time
        from vmm.kernelstore.cache import _store_lock
        with _store_lock(print):
            print("held", flush=True)
            time.sleep(60)
    """)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        lock = store.cache_root() / ".lock"
        with open(lock) as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        child.send_signal(signal.SIGKILL)
        child.wait()
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free at once
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_prune_killed_half_way_leaves_no_trusted_tree(cache):
    """prune_sources killed while deleting a source tree: the tree's "unpacked" mark is
    already gone, so the next build unpacks it again rather than build from a remnant."""
    from vmm.kernelstore import cache as store

    d = store.cache_root() / "build" / "7.3-abc"
    tree = d / "src" / "linux-source-7.3"
    (tree / "kernel").mkdir(parents=True)
    (tree / "kernel" / "sched.c").write_text("x")
    (tree / ".vmm-unpacked").write_text("{}\n")
    (d / "bzImage").write_bytes(b"k")
    store._write_manifest(d, store.KernelArtifacts("build-7.3-abc", "7.3", d / "bzImage", None,
                                                   None, None), source="build")
    run_killed("""
        import os, shutil, signal
        from vmm.kernelstore import cache
        shutil.rmtree = lambda path, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        cache.prune_sources()
    """, cache)
    assert (tree / "kernel" / "sched.c").exists()  # the kill came before the tree went
    assert not (tree / ".vmm-unpacked").exists()
    assert store._read_manifest(d) is not None  # the built kernel itself stays usable
