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
from vmm.machine.initramfs import build_static_program, parse_newc

needs_busybox = pytest.mark.skipif(
    shutil.which("busybox") is None, reason="needs busybox-static: apt-get install busybox-static")


def _by_path(entries):
    return {e.path: e for e in entries}


def _is_static_elf(data: bytes) -> bool:
    """An x86-64 ELF executable without PT_INTERP (no loader needed)."""
    import io

    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(data))
    return (elf["e_machine"] == "EM_X86_64" and elf["e_type"] == "ET_EXEC"
            and not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments()))


@needs_busybox
def test_job_initramfs_has_init_busybox_and_command(tmp_path):
    image = guestjob.build_job_initramfs("echo hello; exit 7")
    entries = _by_path(parse_newc(image.read_bytes()))
    # /init is job-init.c built as a static ELF: the kernel needs only CONFIG_BINFMT_ELF
    # to start it (a script would need CONFIG_BINFMT_SCRIPT too)
    assert entries["init"].data == build_static_program("job-init").read_bytes()
    assert _is_static_elf(entries["init"].data)
    assert stat.S_IMODE(entries["init"].mode) == 0o755 and stat.S_ISREG(entries["init"].mode)
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


def test_line_parsers_allow_the_kernels_record_prefix():
    """The job's lines reach the console as kernel log records (kernels/init/relay.h): a
    kernel with CONFIG_PRINTK_TIME / CONFIG_PRINTK_CALLER stamps each; the anchored
    parsers take the stamp and nothing else before the line."""
    from vmm.machine.workload import BEGIN_RE
    from vmm.scxselftests import _STAMP

    assert guestjob.job_status(b"[   12.345678] vmm-job: exit 4\n") == 4
    assert guestjob.job_status(b"[   12.345678][    T1] vmm-job: exit 5\n") == 5
    assert guestjob.job_status(b"[    T1] vmm-job: exit 6\n") == 6
    assert guestjob.job_status(b"junk [ 1.5] vmm-job: exit 3\n") is None
    assert guestjob.JOB_END_RE.search("[    2.000001] vmm-job: start\n")
    assert BEGIN_RE.search("[    3.1] vmm-workload: begin name=hackbench cgroup= scx=\n")
    assert _STAMP.match("[    4.2] @4.20 TEST: minimal").groups() == ("4.20", "TEST: minimal")


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


# --------------------------------------------------------------------------------------
# A job that cannot start: the kernel's lines and the init's, turned into the cause
# --------------------------------------------------------------------------------------
BOOT = """[    0.000000] Linux version 7.3.0 (root@host) (gcc 14.2.0) #1 SMP
[    0.402113] Freeing unused kernel image (initmem) memory: 1100K
[    0.402514] Write protecting the kernel read-only data: 12288k
"""
FALLBACK_TO_SH = """[    0.403911] Run /sbin/init as init process
[    0.404230] Run /etc/init as init process
[    0.404533] Run /bin/init as init process
[    0.404811] Run /bin/sh as init process
/bin/sh: can't access tty; job control turned off
~ # """


def test_no_binfmt_elf_is_named_from_the_kernels_line():
    # What a kernel built without CONFIG_BINFMT_ELF prints (or one without
    # CONFIG_BINFMT_SCRIPT for a script /init): init/main.c's pr_err, then its fallbacks.
    text = BOOT + "[    0.403001] Run /init as init process\n" \
        "[    0.403312] Failed to execute /init (error -8)\n" + FALLBACK_TO_SH
    why = guestjob.init_failure(text)
    assert "'Failed to execute /init (error -8)'" in why  # the kernel's line, quoted
    assert "-8 ENOEXEC" in why and "CONFIG_BINFMT_ELF" in why and "CONFIG_BINFMT_SCRIPT" in why
    assert why.endswith("Kernel options to check: CONFIG_BINFMT_ELF")
    assert "Run /bin/sh as init process" in why  # what the kernel did next
    assert guestjob.init_failure(text.encode()) == why  # bytes as well as text


@pytest.mark.parametrize("err, words", [
    (-2, ["-2 ENOENT", "interpreter", "PT_INTERP"]),
    (-13, ["-13 EACCES", "not executable"]),
    (-12, ["-12 ENOMEM", "--memory"]),
    (-7, ["-7 E2BIG"]),
    (-40, ["-40 ELOOP"]),
    (-5, ["-5 EIO", "Input/output error"]),  # not in the table: errno's own words
])
def test_exec_errors_map_to_their_causes(err, words):
    text = f"[    0.41] Run /init as init process\n[    0.42] Failed to execute /init (error {err})\n"
    why = guestjob.init_failure(text)
    for w in words:
        assert w in why, why
    assert "Kernel options to check" not in why  # none of these is a missing option


@pytest.mark.parametrize("line, option", [
    ("vmm-job: error mount devtmpfs on /dev: -19 ENODEV (CONFIG_DEVTMPFS)", "CONFIG_DEVTMPFS"),
    ("vmm-job: error mount proc on /proc: -19 ENODEV (CONFIG_PROC_FS)", "CONFIG_PROC_FS"),
    ("vmm-job: error mount sysfs on /sys: -19 ENODEV (CONFIG_SYSFS)", "CONFIG_SYSFS"),
])
def test_init_setup_errors_name_the_option(line, option):
    text = BOOT + "[    0.403001] Run /init as init process\r\n\r\n" + line + "\r\n"
    why = guestjob.init_failure(text)
    assert repr(line) in why and f"built without {option}" in why, why
    assert why.endswith(f"Kernel options to check: {option}")
    assert guestjob.JOB_END_RE.search(text).group(0).strip() == line


def test_init_setup_error_without_an_option():
    why = guestjob.init_failure("Run /init as init process\nvmm-job: error open /vmm/job: -2 ENOENT\n")
    assert "'vmm-job: error open /vmm/job: -2 ENOENT'" in why and "could not set up" in why
    assert "Kernel options" not in why


def test_no_console_and_no_initramfs():
    why = guestjob.init_failure(BOOT + "[    0.40] Warning: unable to open an initial console.\n")
    assert "CONFIG_TTY" in why and "stdin" in why
    # The initramfs was not unpacked (no CONFIG_RD_GZIP for a .cpio.gz): no /init, so the
    # kernel tries a root device and panics.
    text = BOOT + ("[    0.30] Initramfs unpacking failed: invalid magic at start of compressed archive\n"
                   "[    0.41] VFS: Cannot open root device \"\" or unknown-block(0,0): error -6\n"
                   "[    0.41] Please append a correct \"root=\" boot option; here are the available partitions:\n"
                   "[    0.41] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n")
    why = guestjob.init_failure(text)
    assert "Unable to mount root fs on unknown-block(0,0)" in why
    assert "invalid magic" in why and "CONFIG_BLK_DEV_INITRD" in why and "CONFIG_RD_GZIP" in why


def test_no_working_init_alone_and_fallback_alone():
    why = guestjob.init_failure("[ 1.0] Kernel panic - not syncing: No working init found.  Try passing "
                                "init= option to kernel.\n")
    assert "No working init found" in why
    assert "did not run" in guestjob.init_failure(BOOT + FALLBACK_TO_SH)


def test_a_job_that_started_is_not_a_failed_init():
    assert guestjob.init_failure(BOOT + "[    0.40] Run /init as init process\n") is None
    # after the init's start line, whatever the job prints is its own business
    text = (BOOT + "[    0.40] Run /init as init process\nvmm-job: start\n"
            "Failed to execute /init (error -8)\nvmm-job: error mount x\nNo working init found\n"
            "\nvmm-job: exit 0\n")
    assert guestjob.init_failure(text) is None
    assert guestjob.job_status(text) == 0


def test_job_end_pattern():
    end = guestjob.JOB_END_RE
    assert end.search("hello\nvmm-job: exit 3\r\n").group(0).startswith("vmm-job: exit 3")
    assert end.search("[    0.4] Failed to execute /init (error -2)\n")
    assert end.search("[    0.4] Run /bin/sh as init process\n")
    assert end.search("[    0.4] Warning: unable to open an initial console.\n")
    assert not end.search(BOOT + "[    0.40] Run /init as init process\n")
    # the start line ends the watch: what the job prints after it is never searched
    started = BOOT + "[    0.40] Run /init as init process\nvmm-job: start\nFailed to execute /init (error -8)\n"
    assert end.search(started).group(0) == "vmm-job: start"
    assert not end.search("echo vmm-job: exit 3\n")  # not at a line start


class _FakeMachine:
    """What _watch_job uses of a Machine: the console, the wait, the end, stop()."""

    def __init__(self, text, ended=False):
        self.text, self.exit, self.stopped = text, ("reset" if ended else None), False

    def console_text(self):
        return self.text

    def wait_for_console(self, pattern, timeout=None):
        import re

        from vmm.errors import GuestBootError

        m = re.compile(pattern).search(self.text)
        if m is None:
            raise GuestBootError("console never matched: the VM ended")
        return m

    def stop(self):
        self.stopped = True


def test_session_stops_and_raises_at_once_when_the_job_cannot_start():
    from vmm.session import _watch_job

    m = _FakeMachine(BOOT + "[    0.40] Failed to execute /init (error -8)\n" + FALLBACK_TO_SH)
    with pytest.raises(guestjob.GuestInitError, match="CONFIG_BINFMT_ELF") as e:
        _watch_job(m)
    assert m.stopped and isinstance(e.value, guestjob.GuestJobError)
    ok = _FakeMachine(BOOT + "vmm-job: start\nhi\nvmm-job: exit 0\n")
    _watch_job(ok)
    assert not ok.stopped
    # the job's own output, however alarming, is the job's
    job = _FakeMachine(BOOT + "vmm-job: start\nvmm-job: error x (CONFIG_Y)\nNo working init found\n")
    _watch_job(job)
    assert not job.stopped
    ended = _FakeMachine(BOOT + "Kernel panic - not syncing: Fatal exception\n", ended=True)
    _watch_job(ended)  # the VM ended without either line: wait_job's GuestBootError says so
    assert not ended.stopped


# --------------------------------------------------------------------------------------
# The init itself, run on the host as PID 1 of a new PID and mount namespace
# --------------------------------------------------------------------------------------
def _can_run_init_in_namespace():
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("busybox") is None:
        return False
    r = subprocess.run(["unshare", "--fork", "--pid", "--mount", "--propagation", "private",
                        "true"], capture_output=True, timeout=30)
    return r.returncode == 0


def _run_init(root, timeout=60):
    # In a PID namespace of its own, init's reboot(RESTART) ends that namespace (its PID 1
    # gets SIGHUP), not the host; its mounts stay in its own mount namespace.  The job's
    # output stays on stdout: its relay to /dev/kmsg would write the host's own log (and
    # its printk_devkmsg sysctl); the lane's tests run the relay (test_guestjob_linux.py).
    return subprocess.run(["unshare", "--fork", "--pid", "--mount", "--propagation", "private",
                           "chroot", str(root), "/init"], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "VMM_JOB_STDIO": "console"})


def _job_root(tmp_path, command, entries=None):
    root = tmp_path / "root"
    for e in entries if entries is not None else guestjob.job_entries(command):
        path = root / e.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if stat.S_ISDIR(e.mode):
            path.mkdir(exist_ok=True)
        elif stat.S_ISLNK(e.mode):
            os.symlink(e.data.decode(), path)
        elif stat.S_ISREG(e.mode):
            path.write_bytes(e.data)
            path.chmod(stat.S_IMODE(e.mode))
        # device nodes: the init mounts devtmpfs over /dev; stdio comes from the test
    return root


@pytest.mark.skipif(not _can_run_init_in_namespace(),
                    reason="needs root, unshare (util-linux) and busybox-static")
def test_job_init_runs_the_job_as_pid_1(tmp_path):
    root = _job_root(tmp_path, "echo job-says $0 pid $$; echo PATH=$PATH HOME=$HOME TERM=$TERM; "
                               "ls /proc/self/ >/dev/null && ls /sys/kernel >/dev/null && "
                               "test -c /dev/null && echo mounts-ok; sleep 30 & exit 7\n\n")
    r = _run_init(root)
    out = r.stdout
    assert "vmm-job: start\n" in out, out + r.stderr
    assert "job-says sh pid 3" in out  # busybox --install ran as pid 2, the job is pid 3
    assert "PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ TERM=dumb" in out
    assert "mounts-ok" in out, out
    assert out.endswith("\nvmm-job: exit 7\n") and guestjob.job_status(out) == 7
    assert guestjob.init_failure(out) is None
    # a job killed by a signal: 128 + the signal, as a shell says
    r = _run_init(_job_root(tmp_path / "k", "kill -9 $$"))
    assert guestjob.job_status(r.stdout) == 137, r.stdout


@pytest.mark.skipif(not _can_run_init_in_namespace(),
                    reason="needs root, unshare (util-linux) and busybox-static")
def test_job_init_reports_a_failed_setup_and_the_host_maps_it(tmp_path):
    entries = [e for e in guestjob.job_entries("echo never") if e.path != "sys"]
    r = _run_init(_job_root(tmp_path, "", entries))
    assert "\nvmm-job: error mount sysfs on /sys: -2 ENOENT\n" in r.stdout, r.stdout + r.stderr
    assert "vmm-job: start" not in r.stdout and guestjob.job_status(r.stdout) is None
    assert "mount sysfs on /sys: -2 ENOENT" in guestjob.init_failure(r.stdout)


# --------------------------------------------------------------------------------------
# vmm run --exec, end to end on KVM with our test guest standing in for the kernel
# --------------------------------------------------------------------------------------
GUEST = os.path.join(os.path.dirname(__file__), "..", "kernels", "guests", "out", "guest.elf")


def _linux_looking_guest(tmp_path):
    """Our test guest as a bzImage (so vmm treats it as Linux and checks its config), with a
    .config that has everything a job needs."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from fuzz.synthetic_images import compress, make_bzimage

    from test_kconfig import JOB_GOOD

    shutil.copy(GUEST, tmp_path / "vmlinux")
    data = open(GUEST, "rb").read()
    (tmp_path / "bzImage").write_bytes(make_bzimage(compress("gzip", data)))
    (tmp_path / ".config").write_text(JOB_GOOD)
    return str(tmp_path / "bzImage")


@pytest.mark.kvm
@needs_busybox
@pytest.mark.skipif(not os.path.exists(GUEST), reason="test guest not built: make guests")
def test_cli_exec_exits_1_at_once_when_the_kernel_cannot_start_init(tmp_path, monkeypatch, capsys):
    """The kernel's line arrives on the console (here appended to the console log while
    our looping test guest runs): `vmm run --exec` stops the VM and exits 1 with the cause,
    long before its --timeout."""
    import threading
    import time

    from vmm import cli, session

    monkeypatch.setattr(guestjob, "check_host", lambda: None)  # the PVM refusal, off
    start = session.Machine.start

    def start_then_fail_init(self, *a, **kw):
        out = start(self, *a, **kw)
        threading.Timer(0.5, self.console_log.append, [
            b"[    0.403001] Run /init as init process\n"
            b"[    0.403312] Failed to execute /init (error -8)\n"
            b"[    0.404811] Run /bin/sh as init process\n"]).start()
        return out

    monkeypatch.setattr(session.Machine, "start", start_then_fail_init)
    t0 = time.monotonic()
    rc = cli.main(["run", "--kernel", _linux_looking_guest(tmp_path), "--cmdline", "mode=loop",
                   "--timeout", "120", "--quiet", "--exec", "true"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert time.monotonic() - t0 < 60, err  # not the timeout
    assert err.startswith("vmm: error: the guest job never started: the kernel said "
                          "'Failed to execute /init (error -8)': -8 ENOEXEC"), err
    assert err.rstrip().endswith("Kernel options to check: CONFIG_BINFMT_ELF"), err
