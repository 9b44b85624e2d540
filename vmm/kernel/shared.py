"""One parsed Kernel per set of unchanged files, per process.

Parsing a kernel's symbols and BTF takes 70-130 ms on our hosts (more under an emulator):
more than restoring a clone from a snapshot. Machines of one kernel in one process (clones
of a template, a pytest session's tests) share the parsed Kernel: it is read-only once
built and keeps no file open. A file replaced or rewritten (another inode, size or
modification time) is parsed again. The few most recent are kept.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from vmm.kernel.kernel import Kernel

KEEP = 2  # kernels kept parsed (each a few tens of MB of Python objects)

_lock = threading.Lock()
_loaded: "OrderedDict[tuple, Kernel]" = OrderedDict()


def _identity(path) -> tuple | None:
    if path is None:
        return None
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def load_shared(vmlinux=None, system_map=None, bzimage=None) -> Kernel:
    """Kernel.load(vmlinux=, system_map=, bzimage=) of these paths, parsed once while
    the files stay as they are. Bytes (not paths) are parsed every time."""
    given = {"vmlinux": vmlinux, "system_map": system_map, "bzimage": bzimage}
    if any(isinstance(v, (bytes, bytearray, memoryview)) for v in given.values()):
        return Kernel.load(**given)
    try:
        key = tuple((k, _identity(v)) for k, v in given.items())
    except OSError:
        return Kernel.load(**given)  # its own error names the file
    with _lock:
        kernel = _loaded.get(key)
        if kernel is not None:
            _loaded.move_to_end(key)
            return kernel
    kernel = Kernel.load(**given)
    with _lock:
        _loaded[key] = kernel
        while len(_loaded) > KEEP:
            _loaded.popitem(last=False)
    return kernel


def forget() -> None:
    """Drops every kept Kernel (tests that count memory)."""
    with _lock:
        _loaded.clear()
