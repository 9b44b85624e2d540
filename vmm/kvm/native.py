"""Lazy access to the C core (vmm._native) and the errno -> KvmIoctlError rule.

The extension is built by `python ffi/build_native.py` (or `pip install -e .`);
importing vmm.kvm must not fail before it exists, so it is loaded on first use.
"""

from __future__ import annotations

import functools

from vmm.errors import VmmError, KvmIoctlError


@functools.cache
def native():
    """(ffi, lib) of vmm._native; a VmmError saying how to build it when missing."""
    try:
        from vmm import _native
    except ImportError as e:
        raise VmmError(
            f"the C core vmm._native is not built ({e}): run `python ffi/build_native.py` "
            "from the repository root, or `pip install -e .`"
        ) from None
    return _native.ffi, _native.lib


def check(name: str, result: int, detail: str = "") -> int:
    """Returns result, or raises KvmIoctlError(name, errno) when it is -errno."""
    if result < 0:
        raise KvmIoctlError(name, -result, detail)
    return result


def ioctl(fd: int, name: str, arg=None, detail: str = "") -> int:
    """ioctl(fd, KVM_<name>, pointer-or-NULL), errors named after the ioctl."""
    ffi, lib = native()
    request = getattr(lib, name)
    ptr = ffi.NULL if arg is None else arg
    return check(name, lib.vmm_ioctl(fd, request, ptr), detail)


def ioctl_int(fd: int, name: str, value: int, detail: str = "") -> int:
    """ioctl(fd, KVM_<name>, integer argument)."""
    _, lib = native()
    return check(name, lib.vmm_ioctl_int(fd, getattr(lib, name), value), detail)
