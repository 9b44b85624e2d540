"""Lazy access to the C core (vmm._native) and the errno -> KvmIoctlError rule.

The extension is built by `python ffi/build_native.py` (or `pip install -e .`);
importing vmm.kvm must not fail before it exists, so it is loaded on first use.
"""

from __future__ import annotations

import functools
import os
import sys

from vmm.errors import VmmError, KvmIoctlError


@functools.cache
def native():
    """(ffi, lib) of vmm._native; a VmmError saying how to build it when missing."""
    path = os.environ.get("VMM_NATIVE")
    if path:  # another build of the C core (the sanitizer build of make test-asan)
        return _load_from(path)
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


def _load_from(path: str):
    """(ffi, lib) of the extension module file `path`, registered as vmm._native."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vmm._native", path)
    if spec is None or spec.loader is None or not os.path.exists(path):
        raise VmmError(f"VMM_NATIVE={path}: no such extension module; build it with "
                       "VMM_SANITIZE=1 python ffi/build_native.py (or unset VMM_NATIVE)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["vmm._native"] = module
    return module.ffi, module.lib
