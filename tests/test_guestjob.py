"""The guest job (--exec / --include): initramfs assembly, library resolution, status
line, and the refusal on PVM hosts.  Running a job needs guest user space that makes
system calls: tests/test_scx_linux.py does that (SVM lane or a VMX/SVM host)."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from vmm.errors import ConfigError, VmmError
from vmm.kvm.pvm import is_pvm_host
from vmm.machine import guestjob
from vmm.machine.initramfs import parse_newc

needs_busybox = pytest.mark.skipif(
    shutil.which("busybox") is None, reason="needs busybox-static: apt-get install busybox-static")


def _by_path(entries):
    return {e.path: e for e in entries}


@needs_busybox
def test_job_initramfs_has_init_busybox_and_command(tmp_path):
    image = guestjob.build_job_initramfs("echo hello; exit 7")
    entries = _by_path(parse_newc(image.read_bytes()))
    assert entries["init"].data.startswith(b"#!/bin/busybox sh")
    assert stat.S_IMODE(entries["init"].mode) == 0o755
    assert entries["vmm/job"].data == b"echo hello; exit 7\n"
    assert entries["bin/sh"].data == b"busybox"  # a symlink to busybox
    assert stat.S_ISCHR(entries["dev/console"].mode)
    # same inputs, same archive (cached by content)
    assert guestjob.build_job_initramfs("echo hello; exit 7") == image


@needs_busybox
def test_include_executable_brings_its_loader_and_libraries():
    exe = os.path.realpath(sys.executable)  # a dynamically linked ELF on every host we run on
    libs = guestjob.shared_libraries(exe)
    names = {os.path.basename(g) for g, _ in libs}
    assert any(n.startswith("libc.so") for n in names), names
    assert any(n.startswith("ld-linux") for n in names), names
    # what `ldd` finds is what we found (ldd runs the same loader search)
    # (without the sanitizer runtime make test-asan preloads: ldd would list its libraries)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    ldd = subprocess.run(["ldd", exe], capture_output=True, text=True, env=env).stdout
    for line in ldd.splitlines():
        if "=>" in line and "/" in line.split("=>")[1]:
            assert line.split("=>")[0].strip() in names, line
    entries = _by_path(guestjob.job_entries("true", [f"{exe}:/bin/py"]))
    assert entries["bin/py"].data == open(exe, "rb").read()
    for guest, host in libs:
        assert entries[guest.lstrip("/")].data == host.read_bytes()


def test_static_and_non_elf_files_need_no_libraries(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    assert guestjob.shared_libraries(script) == []
    bb = shutil.which("busybox")
    if bb:
        assert guestjob.shared_libraries(bb) == []  # busybox-static has no PT_INTERP


@needs_busybox
def test_include_directory_keeps_tree_and_links(tmp_path):
    d = tmp_path / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "data.txt").write_text("x")
    (d / "run.sh").write_text("#!/bin/sh\n")
    (d / "run.sh").chmod(0o755)
    os.symlink("sub/data.txt", d / "link")
    entries = _by_path(guestjob.job_entries("true", [f"{d}:/opt/tree", str(d / "run.sh")]))
    assert stat.S_ISDIR(entries["opt/tree"].mode)
    assert entries["opt/tree/sub/data.txt"].data == b"x"
    assert stat.S_ISLNK(entries["opt/tree/link"].mode) and entries["opt/tree/link"].data == b"sub/data.txt"
    # without :GUEST, the file lands at its own absolute path
    assert stat.S_IMODE(entries[str(d / "run.sh").lstrip("/")].mode) == 0o755


def test_include_refusals(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        guestjob.parse_include(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="absolute"):
        guestjob.parse_include(f"{tmp_path}:relative/path")
    with pytest.raises(ConfigError, match="needs a command"):
        guestjob.job_entries("  ")


def test_status_line_is_the_last_one_at_a_line_start():
    assert guestjob.job_status(b"boot\nvmm-job: start\nhello\nvmm-job: exit 7\r\n") == 7
    assert guestjob.job_status("x\nvmm-job: exit 1\nvmm-job: exit 0\n") == 0
    assert guestjob.job_status(b"echo vmm-job: exit 3\n") is None  # not at a line start
    assert guestjob.job_status(b"no status here") is None


@pytest.mark.skipif(not is_pvm_host(), reason="the refusal is for PVM hosts (/sys/module/kvm_pvm)")
def test_exec_refused_at_once_on_pvm():
    from vmm import Machine

    with pytest.raises(guestjob.GuestJobError, match="PVM.*svm_lane"):
        Machine(kernel="kernels/guests/out/guest.elf", exec="true")
    proc = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--kernel",
                           "kernels/guests/out/guest.elf", "--exec", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "make system calls" in proc.stderr and "VMX/SVM" in proc.stderr
    assert isinstance(guestjob.GuestJobError("x"), VmmError)
