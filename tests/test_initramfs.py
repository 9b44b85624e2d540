"""The newc cpio writer, the init programs and the cached initramfs images."""

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vmm.errors import ImageError
from vmm.machine import initramfs as ir


def test_header_layout_and_alignment():
    archive = ir.write_newc([ir.file("init", b"abc", 0o755)])
    assert archive[:6] == b"070701"
    # header 110 + "init\0" (5) = 115 -> padded to 116; data 3 -> padded to 4
    assert archive[116:119] == b"abc"
    assert archive[119:120] == b"\0"
    assert archive[120:126] == b"070701"  # the trailer starts 4-byte aligned
    assert len(archive) % 4 == 0
    mode = int(archive[14:22], 16)
    assert stat.S_ISREG(mode) and mode & 0o777 == 0o755
    assert int(archive[54:62], 16) == 3  # c_filesize
    assert int(archive[94:102], 16) == 5  # c_namesize counts the NUL


def test_round_trip_every_kind():
    entries = [
        ir.directory("etc"),
        ir.file("etc/motd", b"hello\n"),
        ir.symlink("bin/sh", "busybox"),
        ir.char_device("dev/console", 5, 1),
        ir.Entry("dev/vda", b"", stat.S_IFBLK | 0o600, (254, 0)),
        ir.Entry("empty", b""),  # mode without type bits -> regular file
    ]
    parsed = {e.path: e for e in ir.parse_newc(ir.write_newc(entries))}
    assert stat.S_ISDIR(parsed["etc"].mode)
    assert parsed["etc/motd"].data == b"hello\n"
    assert stat.S_ISLNK(parsed["bin/sh"].mode) and parsed["bin/sh"].data == b"busybox"
    assert stat.S_ISDIR(parsed["bin"].mode)  # parent added automatically
    assert stat.S_ISCHR(parsed["dev/console"].mode) and parsed["dev/console"].rdev == (5, 1)
    assert stat.S_ISBLK(parsed["dev/vda"].mode) and parsed["dev/vda"].rdev == (254, 0)
    assert stat.S_ISREG(parsed["empty"].mode)
    order = [e.path for e in ir.parse_newc(ir.write_newc(entries))]
    assert order.index("bin") < order.index("bin/sh")


def test_list_form_with_host_paths_and_bytes(tmp_path):
    host = tmp_path / "prog"
    host.write_bytes(b"\x7fELF...")
    host.chmod(0o750)
    data = ir.create_initramfs(
        [("/sbin/prog", host), ("./etc/x", b"x", 0o600), ("lib", None, stat.S_IFDIR | 0o755),
         ("bin/ls", "busybox", stat.S_IFLNK | 0o777)],
        compress=True,
    )  # fmt: skip
    assert data[:2] == b"\x1f\x8b"
    parsed = {e.path: e for e in ir.parse_newc(data)}
    assert parsed["sbin/prog"].data == b"\x7fELF..." and parsed["sbin/prog"].mode & 0o777 == 0o750
    assert parsed["etc/x"].mode & 0o777 == 0o600
    assert stat.S_ISDIR(parsed["lib"].mode)
    assert parsed["bin/ls"].data == b"busybox"


def test_from_directory(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"1234567")
    os.symlink("b/f", tmp_path / "a" / "link")
    parsed = {e.path: e for e in ir.parse_newc(ir.create_initramfs(tmp_path, compress=False))}
    assert set(parsed) == {"a", "a/b", "a/b/f", "a/link"}
    assert parsed["a/b/f"].data == b"1234567"
    assert parsed["a/link"].data == b"b/f"


def test_deterministic():
    entries = [ir.file("init", b"x" * 1000, 0o755)]
    assert ir.create_initramfs(entries) == ir.create_initramfs(entries)


@pytest.mark.parametrize(
    "bad",
    [
        [ir.file("../escape", b"")],
        [ir.file("", b"")],
        [ir.file("a", b""), ir.file("./a", b"")],
        [("only-one",)],
        ["not a tuple"],
    ],
)
def test_bad_entries_raise_image_error(bad):
    with pytest.raises(ImageError):
        ir.create_initramfs(bad)


def test_missing_host_file_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        ir.create_initramfs([("x", tmp_path / "nope", 0o644)])


@pytest.mark.parametrize("blob", [b"", b"070701zz", b"\x1f\x8bnotgzip", b"070701" + b"0" * 104])
def test_parse_rejects_garbage(blob):
    with pytest.raises(ImageError):
        ir.parse_newc(blob)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio tool not installed")
def test_cpio_tool_reads_our_archive(tmp_path):
    archive = ir.write_newc([ir.file("dir/hello", b"hi\n", 0o644), ir.symlink("dir/l", "hello")])
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, check=True)
    text = listing.stdout.decode()
    assert "dir/hello" in text and "dir/l -> hello" in text
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=archive, cwd=out, check=True)
    assert (out / "dir" / "hello").read_bytes() == b"hi\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
@pytest.mark.parametrize("init", ["spin", "check"])
def test_build_initramfs(cache, init):
    path = ir.build_initramfs(init)
    assert path.exists() and path.name.endswith(".cpio.gz")
    parsed = {e.path: e for e in ir.parse_newc(path.read_bytes())}
    assert parsed["init"].data[:4] == b"\x7fELF" and parsed["init"].mode & 0o111
    assert parsed["dev/console"].rdev == (5, 1)
    assert ir.build_initramfs(init) == path  # cached by content


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_spin_init_makes_no_system_call(cache):
    """Under PVM a syscall from guest user space faults: spin-init must have none."""
    from elftools.elf.elffile import ELFFile

    binary = ir.build_init_program("spin")
    with open(binary, "rb") as f:
        text = ELFFile(f).get_section_by_name(".text").data()
    assert b"\x0f\x05" not in text and b"\xcd\x80" not in text  # syscall, int $0x80


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_build_initramfs_extra_and_unknown(cache):
    path = ir.build_initramfs("spin", extra=[("etc/marker", b"m")])
    assert any(e.path == "etc/marker" for e in ir.parse_newc(path.read_bytes()))
    with pytest.raises(ImageError, match="expected"):
        ir.build_initramfs("nonsense")


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "true"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_check_init_runs(cache):
    """Run check-init as pid 1 of a fresh user+pid+mount namespace: its reboot() then
    only ends that namespace (and would be refused outside it, having no host
    CAP_SYS_BOOT), and its /proc mount stays inside the mount namespace."""
    if not _unshare_works():
        pytest.skip("unprivileged user+pid namespaces (unshare) not available")
    binary = ir.build_init_program("check")
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", str(binary),
         "version", "nonexistent", "../../etc/passwd"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    out = proc.stdout.decode()
    assert "vmm-check-init: start" in out
    assert "Linux version" in out
    assert "cannot open /proc/nonexistent" in out
    assert "refused ../../etc/passwd" in out
    assert "vmm-check-init: done status=2" in out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_check_init_waits_for_the_host_to_set_the_hostname(cache):
    """wait-hostname polls /proc/sys/kernel/hostname until it is no longer "(none)":
    here a sibling process changes it in the same UTS namespace after 0.3 s (in a VM,
    the host writes init_uts_ns.name.nodename while the guest is frozen)."""
    if not _unshare_works():
        pytest.skip("unprivileged user+pid namespaces (unshare) not available")
    binary = ir.build_init_program("check")
    # (the hostname tool refuses "(none)", the kernel's default: write it directly)
    script = ("printf '(none)' > /proc/sys/kernel/hostname; "
              "(sleep 0.3; printf vmm-frozen > /proc/sys/kernel/hostname) & "
              f"exec {binary} wait-hostname sys/kernel/hostname")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount",
                           "--uts", "sh", "-c", script], capture_output=True, timeout=30)
    out = proc.stdout.decode()
    assert "waiting for the host to set the hostname" in out, out
    assert out.index("waiting") < out.index("== /proc/sys/kernel/hostname")
    assert "vmm-frozen" in out and "vmm-check-init: done status=0" in out


def test_gzip_is_what_the_kernel_expects():
    data = ir.create_initramfs([ir.file("init", b"x")])
    assert gzip.decompress(data)[:6] == b"070701"


def test_busybox_initramfs(cache):
    busybox = shutil.which("busybox")
    if busybox is None or not ir._is_static(Path(busybox)):
        pytest.skip("busybox-static not installed")
    parsed = {e.path: e for e in ir.parse_newc(ir.build_initramfs("busybox").read_bytes())}
    assert parsed["init"].data.startswith(b"#!/bin/busybox sh")
    assert parsed["bin/sh"].data == b"busybox" and stat.S_ISLNK(parsed["bin/sh"].mode)
    assert len(parsed["bin/busybox"].data) > 100_000


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 300), st.binary(min_size=1, max_size=8))
def test_parse_garbage_and_mutations_only_raise_image_error(blob, pos, patch):
    good = ir.write_newc([ir.file("a/b", b"xyz"), ir.symlink("l", "a/b")])
    mutated = good[:pos] + patch + good[pos + len(patch):]
    for data in (blob, mutated, b"070701" + blob):
        try:
            ir.parse_newc(data)
        except ImageError:
            pass
