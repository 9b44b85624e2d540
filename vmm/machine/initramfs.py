"""Initramfs images: a newc cpio writer and the tiny init programs we boot with.

The kernel unpacks an initramfs in the "newc" cpio format (070701): each entry is a
110-byte ASCII-hex header, the NUL-terminated name, padding to 4 bytes, the data,
padding to 4 bytes; the archive ends with an entry named ``TRAILER!!!``
(Documentation/driver-api/early-userspace/buffer-format.rst).

``build_initramfs(init="spin"|"check"|"busybox")`` returns a cached .cpio.gz path:

* ``spin``: /init only spins.  The only init a PVM host can run (guest user space
  cannot make system calls there), and enough to keep the kernel alive.
* ``check``: /init prints a marker to /dev/console, prints /proc files named on the
  kernel command line after ``--`` (or ``/proc/version``), and powers off.  For hosts
  with hardware virtualization.
* ``busybox``: busybox-static as /bin/busybox with /init a shell script; only when the
  host has busybox-static installed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from vmm.errors import ImageError, VmmError
from vmm.hostio import atomic_write, sweep_stale, temp_name
from vmm.resources import shipped

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
INIT_SOURCES = shipped("kernels/init")  # package data when installed (vmm/resources.py)
INIT_PROGRAMS = ("spin", "check")
# Flags for our freestanding init programs: no libc, no PIE, static, small.
INIT_CFLAGS = [
    "-static", "-nostdlib", "-ffreestanding", "-fno-pie", "-no-pie", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-Os", "-Wall", "-Wextra", "-Werror",
    "-Wl,--build-id=none", "-Wl,-z,noexecstack",
]  # fmt: skip

# What an entry's content may be: a host path to copy, or the bytes themselves.
Content = Union[str, os.PathLike, bytes, None]


@dataclass(frozen=True)
class Entry:
    """One archive member.

    ``mode`` carries the file type bits (stat.S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR,
    S_IFBLK) plus permissions; a mode without type bits means a regular file.
    Symlinks take their target as ``data``; device nodes take ``rdev=(major, minor)``.
    """

    path: str
    data: bytes = b""
    mode: int = 0o644
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0  # fixed, so identical inputs give identical archives


def directory(path: str, mode: int = 0o755) -> Entry:
    """A directory entry for create_initramfs."""
    return Entry(path, b"", stat.S_IFDIR | (mode & 0o7777))


def file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    """A regular-file entry for create_initramfs."""
    return Entry(path, data, stat.S_IFREG | (mode & 0o7777))


def symlink(path: str, target: str) -> Entry:
    """A symbolic-link entry for create_initramfs."""
    return Entry(path, target.encode(), stat.S_IFLNK | 0o777)


def char_device(path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    """A character-device entry (major, minor) for create_initramfs."""
    return Entry(path, b"", stat.S_IFCHR | (mode & 0o7777), (major, minor))


def _normalise(path: str) -> str:
    """Archive names are relative, without ./ or leading /, and never climb out."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise ImageError(f"initramfs entry {path!r}: empty path")
    if ".." in parts:
        raise ImageError(f"initramfs entry {path!r}: '..' is not allowed")
    return "/".join(parts)


def _header(ino: int, entry: Entry, name: bytes, size: int) -> bytes:
    fields = [
        ino, entry.mode, entry.uid, entry.gid, 1 if not stat.S_ISDIR(entry.mode) else 2,
        entry.mtime, size, 0, 0, entry.rdev[0], entry.rdev[1], len(name) + 1, 0,
    ]  # fmt: skip
    for v in fields:
        if not 0 <= v <= 0xFFFFFFFF:
            raise ImageError(f"initramfs entry {name.decode(errors='replace')!r}: field {v} out of range")
    return NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """Entries -> a newc cpio archive (with TRAILER!!!).  Parent directories that are
    not listed are added automatically, before their children."""
    out = bytearray()
    seen: set[str] = set()
    ino = 1

    def emit(entry: Entry, name: str) -> None:
        nonlocal ino
        raw_name = name.encode()
        if b"\0" in raw_name:
            raise ImageError(f"initramfs entry {name!r}: NUL in name")
        data = entry.data if (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)) else b""
        out.extend(_header(ino, entry, raw_name, len(data)))
        out.extend(raw_name + b"\0")
        out.extend(_pad4(HEADER_SIZE + len(raw_name) + 1))
        out.extend(data)
        out.extend(_pad4(len(data)))
        ino += 1

    for entry in entries:
        mode = entry.mode if stat.S_IFMT(entry.mode) else stat.S_IFREG | entry.mode
        entry = Entry(entry.path, entry.data, mode, entry.rdev, entry.uid, entry.gid, entry.mtime)
        name = _normalise(entry.path)
        if name in seen:
            raise ImageError(f"initramfs entry {name!r} appears twice")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                emit(directory(parent), parent)
        seen.add(name)
        emit(entry, name)
    emit(Entry(TRAILER, b"", 0), TRAILER)
    return bytes(out)


def _load(content: Content) -> bytes:
    if content is None:
        return b""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    try:
        return Path(content).read_bytes()
    except OSError as e:
        raise ImageError(f"initramfs: cannot read {content}: {e}") from e


def entries_from_list(items: Iterable[tuple]) -> list[Entry]:
    """``(archive path, host path or bytes, mode)`` tuples (or Entry objects) -> Entries.

    ``mode`` may include type bits (stat.S_IFDIR, S_IFLNK with the target as the
    content, S_IFCHR) and defaults to a regular file with the host file's mode.
    """
    result = []
    for item in items:
        if isinstance(item, Entry):
            result.append(item)
            continue
        if not isinstance(item, tuple) or not 2 <= len(item) <= 3:
            raise ImageError(f"initramfs entry {item!r}: expected (path, content[, mode])")
        path, content = item[0], item[1]
        if len(item) == 3:
            mode = item[2]
        elif isinstance(content, (str, os.PathLike)):
            mode = os.stat(content).st_mode & 0o7777
        else:
            mode = 0o644
        if stat.S_ISLNK(mode):
            target = content if isinstance(content, (bytes, bytearray)) else str(content).encode()
            result.append(Entry(path, bytes(target), mode))
        else:
            result.append(Entry(path, _load(content) if not stat.S_ISDIR(mode) else b"", mode))
    return result


def entries_from_directory(root: str | os.PathLike) -> list[Entry]:
    """Every file, directory, symlink and device node under ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ImageError(f"initramfs: {root} is not a directory")
    result = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            host = Path(dirpath) / name
            rel = host.relative_to(root).as_posix()
            st = host.lstat()
            if stat.S_ISLNK(st.st_mode):
                result.append(Entry(rel, os.readlink(host).encode(), st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                result.append(Entry(rel, host.read_bytes(), st.st_mode))
            elif stat.S_ISDIR(st.st_mode):
                result.append(Entry(rel, b"", st.st_mode))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                result.append(Entry(rel, b"", st.st_mode, rdev))
            # sockets and FIFOs are skipped: an initramfs has no use for them
    result.sort(key=lambda e: e.path)
    return result


def create_initramfs(source, compress: bool = True) -> bytes:
    """A directory path or an iterable of entries/tuples -> archive bytes (gzip by default)."""
    if isinstance(source, (str, os.PathLike)):
        entries = entries_from_directory(source)
    else:
        entries = entries_from_list(source)
    archive = write_newc(entries)
    # mtime=0: byte-identical output for identical input (cache keys, reproducibility)
    return gzip.compress(archive, compresslevel=6, mtime=0) if compress else archive


MAX_INITRAMFS = 1 << 30  # parse_newc's default output limit for a compressed archive
_HEX8 = re.compile(rb"[0-9a-fA-F]{8}")


def gunzip_bounded(data: bytes, max_size: int, what: str = "initramfs") -> bytes:
    """Every gzip member of data, decompressed in chunks; ImageError when the stream is
    corrupt or the output would pass max_size bytes (memory stays near max_size)."""
    out = bytearray()
    rest = data
    while rest:
        d = zlib.decompressobj(wbits=31)
        try:
            while rest:
                out += d.decompress(rest, max_size + 1 - len(out))
                if len(out) > max_size:
                    raise ImageError(f"{what}: gzip stream expands to more than {max_size} bytes; "
                                     "refusing (corrupt or hostile archive?)")
                rest = d.unconsumed_tail
                if d.eof:
                    break
            if not d.eof:
                raise ImageError(f"{what}: bad gzip stream: truncated after {len(out)} bytes")
        except zlib.error as e:
            raise ImageError(f"{what}: bad gzip stream: {e}") from None
        rest = d.unused_data.lstrip(b"\0")  # members may follow, padded with zeros
    return bytes(out)


def parse_newc(archive: bytes, max_size: int = MAX_INITRAMFS) -> list[Entry]:
    """Archive bytes (gzip or plain) -> entries, without the trailer.  For tests and tools.
    A gzip archive may expand to at most max_size bytes."""
    if archive[:2] == b"\x1f\x8b":
        archive = gunzip_bounded(archive, max_size)
    entries = []
    off = 0
    while True:
        head = archive[off : off + HEADER_SIZE]
        if len(head) < HEADER_SIZE or head[:6] != NEWC_MAGIC:
            raise ImageError(f"initramfs: no newc header at offset {off}")
        raw = [head[6 + 8 * i : 14 + 8 * i] for i in range(13)]
        for i, field in enumerate(raw):
            if not _HEX8.fullmatch(field):  # int(x, 16) would take signs and underscores
                raise ImageError(f"initramfs: header at offset {off}: field {_NEWC_FIELDS[i]} "
                                 f"is {field!r}, not 8 hex digits")
        f = [int(x, 16) for x in raw]
        mode, uid, gid, mtime, size, rmaj, rmin, namesize = f[1], f[2], f[3], f[5], f[6], f[9], f[10], f[11]
        name_start = off + HEADER_SIZE
        if namesize == 0 or name_start + namesize > len(archive):
            raise ImageError(f"initramfs: header at offset {off}: name size {namesize} "
                             f"{'is zero' if not namesize else 'runs past the end'}")
        name = archive[name_start : name_start + namesize - 1].decode(errors="replace")
        data_start = name_start + namesize + (-(HEADER_SIZE + namesize) % 4)
        data = archive[data_start : data_start + size]
        if len(data) != size:
            raise ImageError(f"initramfs: entry at offset {off} truncated")
        if name == TRAILER:
            return entries
        entries.append(Entry(name, data, mode, (rmaj, rmin), uid, gid, mtime))
        nxt = data_start + size + (-size % 4)
        assert nxt > off  # namesize >= 1: every step moves forward
        off = nxt


_NEWC_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
                "devminor", "rdevmajor", "rdevminor", "namesize", "check")


# --------------------------------------------------------------------------------------
# Init programs and cached images
# --------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    from vmm.resources import cache_dir

    return cache_dir("initramfs")


def build_init_program(name: str) -> Path:
    """Compile kernels/init/<name>-init.c into the cache (once per source hash)."""
    if name not in INIT_PROGRAMS:
        raise ImageError(f"init program {name!r}: expected one of {', '.join(INIT_PROGRAMS)}")
    return build_static_program(f"{name}-init")


def build_request_client() -> Path:
    """kernels/init/vmm-request.c compiled (cached): the guest's client for requests to
    the host (vmm/runtime/requests.py); guest jobs carry it as /bin/vmm-request."""
    return build_static_program("vmm-request")


def build_static_program(program: str) -> Path:
    """Compile kernels/init/<program>.c (freestanding, static, with its headers) into the cache,
    once per source hash; `make -C kernels/init` output in out/ when newer saves it."""
    src = INIT_SOURCES / f"{program}.c"
    prebuilt = INIT_SOURCES / "out" / program
    try:
        source = src.read_bytes()
    except OSError as e:
        raise ImageError(f"program source {src} missing: {e}") from e
    # The headers every program may include (sys.h, relay.h): part of its source.
    headers = sorted(INIT_SOURCES.glob("*.h"))
    # `make -C kernels init` output, when newer than its sources, saves a compile.
    newest_source = max([src.stat().st_mtime] + [h.stat().st_mtime for h in headers])
    if prebuilt.exists() and prebuilt.stat().st_mtime >= newest_source:
        return prebuilt
    for h in headers:
        source += h.read_bytes()
    digest = hashlib.sha256(source + " ".join(INIT_CFLAGS).encode()).hexdigest()[:12]
    out = _cache_dir() / "bin" / f"{program}-{digest}"
    if out.exists():
        return out
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise VmmError(f"building {program} needs a C compiler (gcc): apt-get install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)  # a compile killed earlier: its temp (its writer is gone) goes
    tmp = temp_name(out)
    import subprocess  # here, not at the top: a cached init (every boot but the first) needs none

    proc = subprocess.run([cc, *INIT_CFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"compiling {src.name} failed:\n{proc.stderr.strip()[-2000:]}")
    tmp.replace(out)
    return out


def _base_entries() -> list[Entry]:
    # /dev/console must exist before devtmpfs is mounted: the kernel opens it for
    # init's stdin/stdout/stderr right after unpacking the initramfs.
    return [
        directory("dev"),
        char_device("dev/console", 5, 1),
        directory("proc"),
        directory("sys"),
        directory("tmp", 0o1777),
    ]


BUSYBOX_INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "vmm-init: busybox up"
cat /proc/version
exec /bin/busybox sh
"""


def build_initramfs(init: str = "spin", extra: Iterable = (), compress: bool = True) -> Path:
    """A cached initramfs with /init = the named program, plus ``extra`` entries.

    ``extra``: (archive path, host path or bytes, mode) tuples or Entry objects.
    """
    entries = _base_entries()
    if init in INIT_PROGRAMS:
        entries.append(file("init", build_init_program(init).read_bytes(), 0o755))
    elif init == "busybox":
        busybox = shutil.which("busybox")
        if busybox is None or not _is_static(Path(busybox)):
            raise VmmError("init='busybox' needs busybox-static: apt-get install busybox-static")
        entries += [
            directory("bin"),
            file("bin/busybox", Path(busybox).read_bytes(), 0o755),
            symlink("bin/sh", "busybox"),
            file("init", BUSYBOX_INIT, 0o755),
        ]
    else:
        raise ImageError(f"init {init!r}: expected 'spin', 'check' or 'busybox'")
    entries += entries_from_list(extra)
    image = create_initramfs(entries, compress=compress)
    digest = hashlib.sha256(image).hexdigest()[:12]
    out = _cache_dir() / f"{init}-{digest}.cpio{'.gz' if compress else ''}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, image)  # a per-writer temp name: parallel builders never share one
    return out


def _is_static(path: Path) -> bool:
    """An ELF without a PT_INTERP program header runs without a dynamic loader."""
    try:
        from elftools.elf.elffile import ELFFile

        with open(path, "rb") as f:
            return not any(seg["p_type"] == "PT_INTERP" for seg in ELFFile(f).iter_segments())
    except Exception:  # not an ELF, unreadable: not usable as a static busybox
        return False
