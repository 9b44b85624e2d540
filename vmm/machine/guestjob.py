"""The guest job: a developer's command run by the guest after boot, with host files.

``vmm run --exec 'CMD' --include HOST[:GUEST]`` (and ``Machine(exec=..., include=...)``)
boots real Linux with an initramfs built here:

* ``/bin/busybox`` (the host's busybox-static) and its applets, ``/init`` =
  kernels/init/job-init.c, a static ELF program without libc (so the kernel needs
  CONFIG_BINFMT_ELF and not CONFIG_BINFMT_SCRIPT to start it), which mounts
  proc/sys/devtmpfs (and tmpfs on /tmp when it can), runs CMD through ``busybox sh -c``
  with the console as stdin and a pseudo-terminal as stdout/stderr whose lines it
  writes to /dev/kmsg (kernels/init/relay.h: the console then prints them whole, never
  cut by a kernel message), then prints the status line ``vmm-job: exit N`` and
  reboots (``reboot=k``: the i8042 reset ends the VM).
* ``/bin/vmm-request`` (kernels/init/vmm-request.c): the client for requests to the
  host (``Machine.on_request``; docs/requests.md);
* every ``--include``: a file or a directory tree (symlinks kept), at GUEST or, without
  it, at the same absolute path as on the host;
* for each included dynamically linked ELF: its program interpreter and its DT_NEEDED
  libraries, recursively, found as the dynamic loader would (DT_RPATH, then
  DT_RUNPATH with $ORIGIN, then /etc/ld.so.conf's directories and the default ones),
  copied (dereferenced) under the path where the loader finds them.

The exit status reaches the host through that final console line (see
docs/CONTRACTS.md "Guest job"): our kernel fragment has no IOPL/ioperm, so guest user
space cannot write the exit port, and a tinyconfig kernel without ACPI cannot power off
through \\_S5; a marker line parsed by the host works on any kernel with a console.

A job that cannot start fails at once instead of waiting out the timeout:
``init_failure()`` reads the console for the kernel's own lines ("Failed to execute
/init (error -8)", "No working init found", "Unable to mount root fs", "unable to open
an initial console") and for the init's ``vmm-job: error ...`` lines (a mount the
kernel cannot do), and names the cause and the kernel option; the session waits for
``JOB_END_RE`` (the init's start line or one of those) and raises ``GuestInitError``.

PVM hosts cannot run it (guest user space cannot make system calls there):
``check_host()`` refuses at once, saying where it works.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Iterable, Optional, Sequence

from vmm.errors import ConfigError, ImageError, VmmError
from vmm.hostio import atomic_write
from vmm.resources import cache_dir, shipped
from vmm.kvm.pvm import is_pvm_host
from vmm.machine import initramfs as cpio

JOB_INIT = shipped("kernels/init/job-init.c")  # package data; compiled here, cached
JOB_FILE = "vmm/job"  # where the command lives in the initramfs (read by job-init.c)
REQUEST_CLIENT = "bin/vmm-request"  # kernels/init/vmm-request.c, in every job
# The job's lines, and the init's own from "vmm-job: start" on, reach the console as
# kernel log records (kernels/init/relay.h), which a kernel with CONFIG_PRINTK_TIME (or
# printk.time=1) opens with "[    1.234567] " and one with CONFIG_PRINTK_CALLER with
# "[    T1] ": a parser anchored at a line's start allows for them.
LOG_PREFIX = r"(?:\[ *\d+\.\d+\](?:\[ *[TC]\d+\])? |\[ *[TC]\d+\] )?"
# The last line the init prints: parsed by job_status(); the job's own output may
# precede it on the same console, so it is matched at the start of a line.
STATUS_RE = re.compile(rb"^" + LOG_PREFIX.encode() + rb"vmm-job: exit (\d+)\r?$", re.M)
START_MARKER = "vmm-job: start"
DEFAULT_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                    "/lib", "/usr/lib")  # fmt: skip


class GuestJobError(VmmError):
    """The guest job cannot be assembled or cannot run on this host."""


class GuestInitError(GuestJobError):
    """The guest kernel could not start the job's /init, or the init could not set up
    what the job runs in (the message quotes the console line and names the cause and
    the kernel option)."""


def check_host() -> None:
    """Refuse on a PVM host, where the job's system calls would never return."""
    if is_pvm_host():
        raise GuestJobError(
            "--exec/--include need guest user space that can make system calls; this host's "
            "/dev/kvm is PVM (/sys/module/kvm_pvm), where they cannot. Run it on a host with "
            "hardware virtualization (VMX/SVM), or here inside the SVM lane: "
            "python3 scripts/svm_lane.py run -- vmm run --exec ...")


def parse_include(spec: str) -> tuple[Path, str]:
    """'HOST[:GUEST]' -> (host path, guest path); GUEST defaults to HOST's absolute path."""
    host, sep, guest = str(spec).partition(":")
    if not host:
        raise ConfigError(f"--include {spec!r}: expected HOSTPATH[:GUESTPATH]")
    hp = Path(host).expanduser()
    if not hp.exists():
        raise ConfigError(f"--include {spec!r}: {hp} does not exist on the host")
    gp = guest if sep and guest else str(hp.resolve())
    if not gp.startswith("/"):
        raise ConfigError(f"--include {spec!r}: the guest path must be absolute")
    return hp, gp


# --------------------------------------------------------------------------------------
# Shared libraries, resolved as the dynamic loader would
# --------------------------------------------------------------------------------------
def _elf_info(path: Path) -> Optional[dict]:
    """{interp, needed, rpath, runpath} of a dynamically linked ELF; None otherwise."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            from elftools.common.exceptions import ELFError
            from elftools.elf.dynamic import DynamicSection
            from elftools.elf.elffile import ELFFile

            try:
                elf = ELFFile(f)
                interp = None
                for seg in elf.iter_segments():
                    if seg["p_type"] == "PT_INTERP":
                        interp = seg.get_interp_name()
                info: dict = {"interp": interp, "needed": [], "rpath": [], "runpath": []}
                for sec in elf.iter_sections():
                    if not isinstance(sec, DynamicSection):
                        continue
                    for tag in sec.iter_tags():
                        if tag.entry.d_tag == "DT_NEEDED":
                            info["needed"].append(tag.needed)
                        elif tag.entry.d_tag == "DT_RPATH":
                            info["rpath"] += tag.rpath.split(":")
                        elif tag.entry.d_tag == "DT_RUNPATH":
                            info["runpath"] += tag.runpath.split(":")
                return info
            except (ELFError, ValueError, KeyError) as e:
                raise ImageError(f"--include {path}: not a readable ELF: {e}") from e
    except OSError as e:
        raise ImageError(f"--include {path}: cannot read: {e}") from e


def _ld_so_conf_dirs(conf: str = "/etc/ld.so.conf") -> list[str]:
    dirs: list[str] = []

    def read(name: str) -> None:
        try:
            lines = Path(name).read_text().splitlines()
        except OSError:
            return
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line.startswith("include "):
                for inc in sorted(glob.glob(os.path.join(os.path.dirname(name), line[8:].strip()))):
                    read(inc)
            elif line:
                dirs.append(line)

    read(conf)
    return dirs


def shared_libraries(executable: Path) -> list[tuple[str, Path]]:
    """(guest path, host file) of the loader and every library ``executable`` needs,
    transitively; [] for a static or non-ELF file.  A library that cannot be found is
    an ImageError naming it (the guest's loader would fail the same way)."""
    info = _elf_info(executable)
    if info is None or info["interp"] is None:
        return []
    system_dirs = _ld_so_conf_dirs() + list(DEFAULT_LIB_DIRS)
    out: dict[str, Path] = {}
    interp = info["interp"]
    if not os.path.exists(interp):
        raise ImageError(f"{executable}: its loader {interp} is not on this host")
    out[interp] = Path(os.path.realpath(interp))
    todo = [(executable, info)]
    seen_names: set[str] = set()
    while todo:
        obj, oi = todo.pop()
        origin = str(Path(obj).resolve().parent)

        def expand(d: str) -> str:
            return d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)

        # DT_RPATH is used only when there is no DT_RUNPATH (ld.so(8)).
        search = ([expand(d) for d in oi["rpath"]] if not oi["runpath"] else []) \
            + [expand(d) for d in oi["runpath"]] + system_dirs
        for name in oi["needed"]:
            if name in seen_names:
                continue
            seen_names.add(name)
            found = None
            if "/" in name:
                found = name if os.path.exists(name) else None
            else:
                for d in search:
                    cand = os.path.join(d, name)
                    if os.path.isfile(cand):
                        found = cand
                        break
            if found is None:
                raise ImageError(f"{executable}: needs {name}, not found in {', '.join(search)}")
            # The guest finds it at the default directory it was found in here.
            out.setdefault(os.path.normpath(found), Path(os.path.realpath(found)))
            sub = _elf_info(Path(found))
            if sub is not None:
                todo.append((Path(found), sub))
    return sorted(out.items())


# --------------------------------------------------------------------------------------
# The initramfs
# --------------------------------------------------------------------------------------
def _busybox() -> Path:
    bb = shutil.which("busybox")
    if bb is None or (_elf_info(Path(bb)) or {}).get("interp"):
        raise GuestJobError("the guest job needs a static busybox on the host: "
                            "apt-get install busybox-static")
    return Path(bb)


def _include_entries(host: Path, guest: str) -> list[cpio.Entry]:
    guest = guest.rstrip("/") or "/"
    if host.is_dir():
        entries = [cpio.directory(guest)] if guest != "/" else []
        for e in cpio.entries_from_directory(host):
            entries.append(cpio.Entry(f"{guest}/{e.path}", e.data, e.mode, e.rdev))
        return entries
    st = host.stat()
    return [cpio.file(guest, host.read_bytes(), st.st_mode & 0o7777)]


def job_entries(command: str, includes: Sequence[str] = ()) -> list[cpio.Entry]:
    """Every initramfs entry of a guest job (no caching, no compression)."""
    if not isinstance(command, str) or not command.strip():
        raise ConfigError("--exec needs a command (run through busybox sh -c in the guest)")
    try:
        init = cpio.build_static_program("job-init").read_bytes()
    except (OSError, VmmError) as e:  # no compiler, a failed compile
        raise GuestJobError(f"the guest job's init ({JOB_INIT}) cannot be built: {e}") from e
    entries: dict[str, cpio.Entry] = {}

    def add(e: cpio.Entry) -> None:
        key = cpio._normalise(e.path)
        if key in entries and stat.S_ISDIR(e.mode) and not stat.S_ISDIR(entries[key].mode):
            return  # a file or link beats a directory of the same name
        entries[key] = cpio.Entry(key, e.data, e.mode, e.rdev)

    for e in [cpio.directory("dev"), cpio.char_device("dev/console", 5, 1), cpio.directory("proc"),
              cpio.directory("sys"), cpio.directory("tmp", 0o1777), cpio.directory("bin"),
              cpio.directory("sbin"), cpio.directory("usr/bin"), cpio.directory("usr/sbin")]:
        add(e)
    add(cpio.file("bin/busybox", _busybox().read_bytes(), 0o755))
    add(cpio.symlink("bin/sh", "busybox"))
    add(cpio.file("init", init, 0o755))
    add(cpio.file(JOB_FILE, command.encode() + b"\n", 0o644))
    # The client for requests to the host (COM2, vmm/runtime/requests.py), in every job;
    # an --include of the same path replaces it.
    add(cpio.file(REQUEST_CLIENT, cpio.build_request_client().read_bytes(), 0o755))
    libs: dict[str, Path] = {}
    for spec in includes:
        host, guest = parse_include(spec)
        for e in _include_entries(host, guest):
            add(e)
        # A named file is followed through symlinks; inside a directory, links stay links.
        files = [host.resolve()] if host.is_file() else \
            [Path(p) / n for p, _, ns in os.walk(host) for n in ns]
        for f in files:
            if f.is_file() and not f.is_symlink() and os.access(f, os.X_OK):
                for gpath, hpath in shared_libraries(f):
                    libs.setdefault(gpath, hpath)
    for gpath, hpath in libs.items():
        if cpio._normalise(gpath) not in entries:
            add(cpio.file(gpath, hpath.read_bytes(), 0o755))
    # Sorted by name, a directory comes before its contents (write_newc adds missing
    # parents itself and refuses a name listed twice).
    return sorted(entries.values(), key=lambda e: e.path)


def _cache_dir() -> Path:
    return cache_dir("initramfs")


def build_job_initramfs(command: str, includes: Sequence[str] = ()) -> Path:
    """The guest job's initramfs (.cpio.gz), cached by content hash."""
    image = cpio.create_initramfs(job_entries(command, includes))
    digest = hashlib.sha256(image).hexdigest()[:16]
    out = _cache_dir() / f"job-{digest}.cpio.gz"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, image)  # vmm.hostio: fsynced, renamed; a killed writer's temp is swept
    return out


def job_status(console: bytes | str) -> Optional[int]:
    """The job's exit status from the console (the last status line), or None."""
    if isinstance(console, str):
        console = console.encode("utf-8", "replace")
    found = STATUS_RE.findall(console)
    return int(found[-1]) if found else None


# --------------------------------------------------------------------------------------
# A job that cannot start
# --------------------------------------------------------------------------------------
# What the kernel prints when it cannot start the initramfs's /init (init/main.c:
# kernel_init, run_init_process, try_to_run_init_process, console_on_rootfs; a line may
# carry a "[    1.234567] " timestamp), and the line job-init.c prints when a step before
# the job fails.
_KERNEL_FAILED_INIT = r"Failed to execute /init \(error (-\d+)\)"
_KERNEL_FALLBACK = r"Run (?!/init as )(/\S+) as init process"
_KERNEL_CANNOT_EXEC = r"Starting init: (\S+) exists but couldn't execute it \(error (-\d+)\)"
_KERNEL_NO_INIT = r"Kernel panic - not syncing: No working init found\.?"
_KERNEL_NO_ROOT = r"Kernel panic - not syncing: VFS: Unable to mount root[^\r\n]*"
_KERNEL_NO_CONSOLE = r"Warning: unable to open an initial console\."
_INIT_ERROR = r"^" + LOG_PREFIX + r"vmm-job: error [^\r\n]*"
INIT_FAILURE_RE = re.compile("|".join(f"(?:{p})" for p in (
    _KERNEL_FAILED_INIT, _KERNEL_FALLBACK, _KERNEL_CANNOT_EXEC, _KERNEL_NO_INIT,
    _KERNEL_NO_ROOT, _KERNEL_NO_CONSOLE, _INIT_ERROR)), re.M)
# What the session waits for: the init's start line (from there on the job runs and only
# the VM's end matters; the job's own output can never look like a failed init), its
# status line, or a sign that the job never starts.
JOB_END_RE = re.compile(r"^" + LOG_PREFIX + r"vmm-job: (?:start|exit \d+)\r?$|"
                        + INIT_FAILURE_RE.pattern, re.M)
_START_RE = re.compile(r"^" + LOG_PREFIX + r"vmm-job: start\r?$", re.M)
_OPTION_RE = re.compile(r"\((CONFIG_[A-Z0-9_]+)\)")

# errno of a failed execve of /init -> (name, cause).  The job's /init is a static
# x86-64 ELF program (kernels/init/job-init.c).
EXEC_ERRNO_CAUSES: dict[int, tuple[str, str]] = {
    8: ("ENOEXEC", "the kernel has no handler for /init's format: the job's /init is a "
                   "static ELF program, which needs CONFIG_BINFMT_ELF (a '#!' script needs "
                   "CONFIG_BINFMT_SCRIPT, a 32-bit ELF CONFIG_IA32_EMULATION; a file in "
                   "none of these formats runs on no kernel)"),
    2: ("ENOENT", "/init names an interpreter that is not in the initramfs (its '#!' line, "
                  "or an ELF's PT_INTERP loader)"),
    13: ("EACCES", "/init is not executable (no x bit, or not a regular file) or its "
                   "filesystem is mounted noexec"),
    12: ("ENOMEM", "the guest ran out of memory starting /init: give it more (--memory)"),
    7: ("E2BIG", "/init's arguments and environment are too long (the kernel command "
                 "line's words after '--' and its unknown parameters)"),
    40: ("ELOOP", "too many symbolic links or nested '#!' interpreters"),
    20: ("ENOTDIR", "a component of /init's path or of its interpreter's is not a directory"),
    22: ("EINVAL", "the kernel refused /init's ELF headers (corrupt, or for another "
                   "architecture)"),
    26: ("ETXTBSY", "/init is open for writing"),
    1: ("EPERM", "the kernel refused to run /init (a security module, or a setuid "
                 "restriction)"),
}


def exec_error_cause(err: int) -> str:
    """'-8 ENOEXEC: <cause>' for the error a failed execve of /init returned (negative
    or positive errno)."""
    err = abs(err)
    if err in EXEC_ERRNO_CAUSES:
        name, cause = EXEC_ERRNO_CAUSES[err]
        return f"-{err} {name}: {cause}"
    import errno as errno_mod
    name = errno_mod.errorcode.get(err, "?")
    return f"-{err} {name}: {os.strerror(err)}"


def _options(text: str) -> list[str]:
    return list(dict.fromkeys(_OPTION_RE.findall(text)))


def init_failure(console: bytes | str) -> Optional[str]:
    """Why the guest job never started, from the console, or None.

    Looks only at what precedes the init's ``vmm-job: start`` line (the job's own
    output cannot trigger it): the kernel's lines when it could not execute /init
    (the errno mapped to its cause and the kernel option), its fallback to another
    init, a root-mount panic (the initramfs was not unpacked), no initial console,
    and job-init.c's ``vmm-job: error ...`` lines.  The message quotes the lines."""
    if isinstance(console, bytes):
        console = console.decode("utf-8", "replace")
    start = _START_RE.search(console)
    if start is not None:
        console = console[:start.start()]
    causes: list[str] = []
    options: list[str] = []  # the kernel options the causes point to, first the likeliest
    fallback: list[str] = []
    for m in INIT_FAILURE_RE.finditer(console):
        line = m.group(0).strip()
        if line.startswith("vmm-job: error"):
            opts = _options(line)
            why = (f"the kernel was built without {', '.join(opts)} (a mount that fails with "
                   f"ENODEV: it does not know the filesystem)" if opts and "ENODEV" in line
                   else "the init could not set up what the job runs in")
            causes.append(f"the job's init said {line!r}: {why}")
            options += opts
        elif line.startswith("Failed to execute"):
            err = int(re.search(r"error (-\d+)", line).group(1))
            causes.append(f"the kernel said {line!r}: {exec_error_cause(err)}")
            options += ["CONFIG_BINFMT_ELF"] if abs(err) == 8 else []
        elif line.startswith("Warning: unable to open an initial console"):
            causes.append(f"the kernel said {line!r}: /dev/console has no device behind it, so "
                          "the job would have no stdin/stdout (CONFIG_TTY, and a serial console: "
                          "CONFIG_SERIAL_8250_CONSOLE with console=ttyS0)")
            options += ["CONFIG_TTY", "CONFIG_SERIAL_8250_CONSOLE"]
        elif "Unable to mount root" in line:
            unpack = re.search(r"Initramfs unpacking failed: [^\r\n]*", console)
            causes.append(f"the kernel said {line!r}: it found no /init, so the initramfs was "
                          "not unpacked"
                          + (f" ({unpack.group(0).strip()!r})" if unpack else "")
                          + ": CONFIG_BLK_DEV_INITRD, and CONFIG_RD_GZIP for vmm's .cpio.gz")
            options += ["CONFIG_BLK_DEV_INITRD", "CONFIG_RD_GZIP"]
        elif line.startswith("Run ") or line.startswith("Starting init"):
            fallback.append(line)
        elif "No working init found" in line:
            if not causes:
                causes.append(f"the kernel said {line!r}: it could run no init at all")
    if not causes and fallback:
        causes.append(f"the kernel said {fallback[0]!r}: /init did not run")
    if not causes:
        return None
    text = "the guest job never started: " + "; ".join(causes)
    if fallback:
        text += f" (then: {fallback[-1]!r})"
    if options:
        text += f". Kernel options to check: {', '.join(dict.fromkeys(options))}"
    return text


def includes_list(include: Optional[Iterable[str] | str]) -> list[str]:
    if include is None:
        return []
    return [include] if isinstance(include, (str, os.PathLike)) else [str(i) for i in include]
