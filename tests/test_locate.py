"""A kernel developer's own files: build trees, a bzImage with vmlinux/System.map beside
it, distro kernels under /boot with debug files under /usr/lib/debug (vmm.kernel.locate,
and the CLI/session on top of it)."""

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.errors import KernelFeatureMissing, KernelStoreError
from vmm.kernel import locate as L

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"
sys.path.insert(0, str(Path(__file__).parent))
from fuzz.synthetic_images import compress, make_bzimage  # noqa: E402

needs_guest = pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests")
needs_kvm = pytest.mark.kvm
needs_strip = pytest.mark.skipif(shutil.which("strip") is None or shutil.which("nm") is None
                                 or shutil.which("objcopy") is None,
                                 reason="needs binutils (strip, nm, objcopy)")

pytestmark = [needs_guest, needs_strip]


def vmm(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=env)


def _build_id_note(bid: bytes) -> bytes:
    return struct.pack("<III", 4, len(bid), 3) + b"GNU\0" + bid


def make_kernel(d: Path, *, build_id: bytes | None = None, vmlinux=True, system_map=True,
                bz_name="bzImage"):
    """A bzImage whose payload is the stripped test guest (BTF, no .symtab), with the
    full vmlinux and/or an nm System.map beside it, as a kernel build leaves them."""
    d.mkdir(parents=True, exist_ok=True)
    full = d / ".full"
    shutil.copy(GUEST, full)
    if build_id:
        note = d / ".note"
        note.write_bytes(_build_id_note(build_id))
        subprocess.run(["objcopy", "--add-section", f".note.gnu.build-id={note}", str(full)],
                       check=True)
        note.unlink()
    stripped = d / ".stripped"
    subprocess.run(["strip", "-s", "-o", str(stripped), str(full)], check=True)
    (d / bz_name).write_bytes(make_bzimage(compress("gzip", stripped.read_bytes())))
    if system_map:
        nm = subprocess.run(["nm", "-n", str(full)], check=True, capture_output=True, text=True)
        (d / "System.map").write_text(nm.stdout)
    if vmlinux:
        full.rename(d / "vmlinux")
    else:
        full.unlink()
    return d / bz_name, stripped


# --- finding files ------------------------------------------------------------------
def test_bzimage_finds_vmlinux_and_system_map_beside_it(tmp_path):
    bz, _ = make_kernel(tmp_path)
    files = L.locate(bz)
    assert files.boot == bz and files.vmlinux == tmp_path / "vmlinux"
    assert files.system_map == tmp_path / "System.map"
    assert files.symbols_from == tmp_path / "vmlinux"
    assert "symbols from" in files.describe() and str(tmp_path / "vmlinux") in files.describe()
    k = files.load()
    assert k.symbols.lookup("runqueues").percpu


def test_a_second_locate_answers_from_memory_until_a_file_changes(tmp_path, monkeypatch):
    bz, _ = make_kernel(tmp_path, vmlinux=False)
    first = L.locate(bz)
    looks = []
    monkeypatch.setattr(L, "_locate", lambda *a: looks.append(a) or L.KernelFiles(boot=bz))
    again = L.locate(bz)
    assert not looks and again == first and again is not first  # a copy the caller may change
    again.notes.append("mine")
    assert "mine" not in L.locate(bz).notes
    # A vmlinux put beside the image later (the directory changed): looked for again.
    (tmp_path / "vmlinux").write_bytes(GUEST.read_bytes())
    L.locate(bz)
    assert len(looks) == 1
    # The System.map it found, rewritten: looked for again.
    monkeypatch.undo()
    L._FOUND.clear()
    assert L.locate(bz).system_map == tmp_path / "System.map"
    with open(tmp_path / "System.map", "a") as f:
        f.write("ffffffff81000000 T extra\n")
    monkeypatch.setattr(L, "_locate", lambda *a: looks.append(a) or L.KernelFiles(boot=bz))
    L.locate(bz)
    assert len(looks) == 2


def test_bzimage_with_only_a_system_map_takes_symbols_from_it(tmp_path):
    bz, _ = make_kernel(tmp_path, vmlinux=False)
    files = L.locate(bz)
    assert files.vmlinux is None and files.symbols_from == tmp_path / "System.map"
    k = files.load()
    assert k.symbol("runqueues") and k.has_btf  # BTF from the payload, symbols from the map


def test_directory_and_build_tree(tmp_path):
    loose = tmp_path / "loose"
    make_kernel(loose)
    files = L.locate(loose)
    assert files.boot == loose / "vmlinux" and files.bzimage == loose / "bzImage"
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    make_kernel(tree / "arch/x86/boot")
    shutil.move(tree / "arch/x86/boot/vmlinux", tree / "vmlinux")
    shutil.move(tree / "arch/x86/boot/System.map", tree / "System.map")
    (tree / "Kbuild").write_text("")
    (tree / "Kconfig").write_text("")
    (tree / ".config").write_text("CONFIG_SCHED_CLASS_EXT=y\n")
    files = L.locate(tree)
    assert files.tree == tree and files.boot == tree / "vmlinux"
    assert files.config == tree / ".config"
    assert L.find_build_tree(tree / "arch/x86") == tree
    # The bzImage of a build tree finds the tree's vmlinux and System.map.
    files = L.locate(tree / "arch/x86/boot/bzImage")
    assert files.tree == tree and files.vmlinux == tree / "vmlinux"
    assert files.system_map == tree / "System.map"


def test_empty_source_tree_says_build_it(tmp_path):
    (tmp_path / "Kbuild").write_text("")
    (tmp_path / "Kconfig").write_text("")
    with pytest.raises(KernelStoreError, match="no built kernel"):
        L.locate(tmp_path)


def test_debug_vmlinux_by_build_id(tmp_path):
    bid = bytes(range(20))
    bz, _ = make_kernel(tmp_path / "img", build_id=bid, vmlinux=False, system_map=False)
    debug = tmp_path / "debug" / ".build-id" / bid[:1].hex()
    debug.mkdir(parents=True)
    full = tmp_path / "full"
    make_kernel(full, build_id=bid)
    shutil.copy(full / "vmlinux", debug / f"{bid[1:].hex()}.debug")
    files = L.locate(bz, debug_root=tmp_path / "debug", boot_dir=tmp_path / "boot")
    assert files.vmlinux == debug / f"{bid[1:].hex()}.debug"
    assert any("by build id" in n for n in files.notes)


def test_stale_vmlinux_beside_is_skipped(tmp_path):
    bz, _ = make_kernel(tmp_path / "a", build_id=b"\x01" * 20, vmlinux=False, system_map=False)
    make_kernel(tmp_path / "b", build_id=b"\x02" * 20)
    shutil.copy(tmp_path / "b" / "vmlinux", tmp_path / "a" / "vmlinux")
    files = L.locate(bz, debug_root=tmp_path / "none")
    assert files.vmlinux is None and any("stale" in n for n in files.notes)


def test_distro_layout_boot_and_usr_lib_debug(tmp_path):
    boot = tmp_path / "boot"
    make_kernel(boot, vmlinux=False, system_map=False, bz_name="vmlinuz-7.3.0-1-amd64")
    full = tmp_path / "full"
    make_kernel(full)
    shutil.copy(full / "System.map", boot / "System.map-7.3.0-1-amd64")
    (boot / "config-7.3.0-1-amd64").write_text("CONFIG_SMP=y\n")
    dbg = tmp_path / "debug" / "boot"
    dbg.mkdir(parents=True)
    shutil.copy(full / "vmlinux", dbg / "vmlinux-7.3.0-1-amd64")
    files = L.locate(boot / "vmlinuz-7.3.0-1-amd64", debug_root=tmp_path / "debug",
                     boot_dir=boot)
    assert files.vmlinux == dbg / "vmlinux-7.3.0-1-amd64"
    assert files.system_map == boot / "System.map-7.3.0-1-amd64"
    assert files.config == boot / "config-7.3.0-1-amd64"


def test_given_files_win(tmp_path):
    bz, _ = make_kernel(tmp_path / "a", vmlinux=False, system_map=False)
    make_kernel(tmp_path / "b")
    files = L.locate(bz, vmlinux=tmp_path / "b/vmlinux", system_map=tmp_path / "b/System.map")
    assert files.vmlinux == tmp_path / "b/vmlinux"
    with pytest.raises(KernelStoreError, match="no such file"):
        L.locate(bz, system_map=tmp_path / "nope")


def test_no_symbol_table_is_named(tmp_path):
    _, stripped = make_kernel(tmp_path, vmlinux=False, system_map=False)
    files = L.locate(stripped)
    k = files.load()
    with pytest.raises(KernelFeatureMissing, match="no symbol table.*--system-map"):
        L.require_symbols(k, files)


# --- the command line ---------------------------------------------------------------
def test_cli_symbols_without_symtab_says_what_to_pass(tmp_path):
    _, stripped = make_kernel(tmp_path, vmlinux=False, system_map=False)
    r = vmm("symbols", str(stripped), "runqueues")
    assert r.returncode == 1
    assert "no symbol table" in r.stderr and "--system-map" in r.stderr
    assert "Traceback" not in r.stderr
    # With the System.map beside it, the same command just works.
    nm = subprocess.run(["nm", "-n", str(GUEST)], check=True, capture_output=True, text=True)
    (tmp_path / "System.map").write_text(nm.stdout)
    r = vmm("symbols", str(stripped), "runqueues")
    assert r.returncode == 0 and "runqueues" in r.stdout, r.stderr


@needs_kvm
def test_cli_run_kernel_directory(tmp_path):
    make_kernel(tmp_path)
    r = vmm("run", "--kernel", str(tmp_path), "--cmdline", "mode=hello exit=3")
    assert r.returncode == 3, r.stderr
    assert "Is a directory" not in r.stderr


@needs_kvm
@pytest.mark.parametrize("beside", ["vmlinux", "System.map"])
def test_cli_inject_on_a_bzimage_uses_the_files_beside_it(tmp_path, beside):
    bz, _ = make_kernel(tmp_path, vmlinux=beside == "vmlinux", system_map=True)
    r = vmm("run", "--kernel", str(bz), "--cpus", "2", "--cmdline", "mode=loop cpus=2",
            "--wait-for", "2 cpus up", "--inject-scx", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "read back: every CPU" in r.stderr
    assert f"symbols from {tmp_path / beside}" in r.stderr


@needs_kvm
def test_cli_inject_takes_vmlinux_and_system_map_options(tmp_path):
    bz, _ = make_kernel(tmp_path / "img", vmlinux=False, system_map=False)
    make_kernel(tmp_path / "syms")
    r = vmm("inject", "--kernel", str(bz), "--cpus", "2", "--cmdline", "mode=loop cpus=2",
            "--wait-for", "2 cpus up", "--quiet", "--system-map",
            str(tmp_path / "syms/System.map"))
    assert r.returncode == 0, r.stderr
    assert f"symbols from {tmp_path / 'syms/System.map'}" in r.stderr
    # Without any symbols: one clear line naming what to pass.
    r = vmm("inject", "--kernel", str(bz), "--cpus", "2", "--cmdline", "mode=loop cpus=2",
            "--wait-for", "2 cpus up", "--quiet")
    assert r.returncode != 0 and "no symbol table" in r.stderr, r.stderr


@needs_kvm
def test_cli_run_in_a_build_tree_boots_its_kernel(tmp_path):
    tree = tmp_path / "linux"
    tree.mkdir()
    make_kernel(tree)
    (tree / "Kbuild").write_text("")
    (tree / "Kconfig").write_text("")
    (tree / "kernel").mkdir()
    r = vmm("run", "--cmdline", "mode=hello exit=5", cwd=tree / "kernel")
    assert r.returncode == 5, r.stderr
    r = vmm("run", "--cmdline", "mode=hello exit=5", cwd=tmp_path)
    assert r.returncode == 2 and "--kernel" in r.stderr


def test_session_defers_the_vmlinux_search_to_the_first_symbol_use(tmp_path):
    """Booting a bzImage needs none of its symbols: the session finds its System.map and
    config at once, and the unstripped vmlinux beside it (a build-id comparison) only
    when the symbols are first used."""
    from vmm.session import Machine

    bz, _ = make_kernel(tmp_path / "k", build_id=b"\x03" * 20)
    m = Machine(kernel=str(bz), check_config=False)
    assert m.kernel_files.vmlinux is None and m.kernel_files.system_map == tmp_path / "k" / "System.map"
    assert "vmlinux" in m.introspection_sources() and m.kernel_files.vmlinux == tmp_path / "k" / "vmlinux"
    assert m.kernel_image.symbols.lookup("boot_main") is not None
