"""Files and sockets on the host, made safely; a leaf (imports nothing of vmm).

- ``atomic_output(path)``: a file that appears whole or not at all. Written under a
  temporary name in the same directory (``.NAME.tmp-PID-RANDOM``), fsynced, renamed over
  ``path`` (``os.replace``) only when the ``with`` block ends without an exception; an
  exception removes the temporary file. A process killed mid-write (SIGKILL, power
  loss) leaves at most that temporary file, never a partial ``path``; the next
  ``atomic_output`` of the same name removes temporaries of processes that are gone.
- ``atomic_write(path, data)`` / ``atomic_copy(src, dst)``: the same, for bytes or text
  at once and for a copy of a file.
- ``private=True`` (and ``open_private``): readable and writable by the owner only
  (0600), whatever the umask, also when an existing file is reused: for anything that
  holds guest memory or guest output (vmcores, console logs).
- ``listen_tcp(port, host=LOOPBACK)``: every listening socket of vmm goes through it,
  so it binds the loopback address unless the caller names another one.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path
from typing import BinaryIO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

LOOPBACK = "127.0.0.1"
PRIVATE_MODE = 0o600

_TMP_RE = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (same directory: the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of atomic_output's temporary names (never a whole entry)."""
    return _TMP_RE.match(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(path: Path) -> int:
    """Remove the temporaries of ``path`` left by processes that no longer run; how many."""
    removed = 0
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    for name in names:
        m = _TMP_RE.match(name)
        if m is None or m.group("name") != path.name:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(path.parent / name)
            removed += 1
    return removed


def open_private(path: PathLike, buffering: int = -1) -> BinaryIO:
    """``path`` opened for writing (created or truncated) with mode 0600, whatever the
    umask; an existing regular file's mode is set to 0600 too (a device such as
    /dev/null keeps its own: it holds nothing)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_MODE)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, PRIVATE_MODE)
        return os.fdopen(fd, "wb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: PathLike, *, private: bool = False, mode: int = 0o644,
                  fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file object whose content becomes ``path`` when the block ends cleanly.

    ``mode``: the file's permission bits (umask applied, as open() would), or 0600
    exactly with ``private``."""
    path = Path(path)
    sweep_stale(path)
    tmp = temp_name(path)
    perm = PRIVATE_MODE if private else mode
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, perm)
    try:
        if private:
            os.fchmod(fd, PRIVATE_MODE)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write(path: PathLike, data: Union[bytes, str], *, private: bool = False,
                 mode: int = 0o644) -> None:
    """Write ``data`` (str: UTF-8) to ``path`` atomically (see atomic_output)."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_output(path, private=private, mode=mode) as f:
        f.write(data)


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Copy ``src`` to ``dst`` atomically, keeping its permission bits and times."""
    with open(src, "rb") as s, atomic_output(dst, mode=os.stat(src).st_mode & 0o7777) as d:
        shutil.copyfileobj(s, d, 1 << 20)
    shutil.copystat(src, dst)


def listen_tcp(port: int = 0, host: str = LOOPBACK, backlog: int = 1) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one; see getsockname).

    The one place vmm binds a socket: loopback unless the caller names an address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
