"""Every error vmm raises is a VmmError; each subclass names one kind of problem.

Messages say what went wrong and, where there is one, what to do about it.
"""


class VmmError(Exception):
    """Base class of every error raised by vmm."""


# --- host / KVM -------------------------------------------------------------
class KvmUnavailable(VmmError):
    """/dev/kvm does not exist (no KVM module, or not a Linux host)."""


class KvmPermissionError(VmmError):
    """/dev/kvm exists but this user may not open it."""


class VmClosed(VmmError):
    """The VM was stopped and its resources freed; nothing can run, freeze or thaw it."""


class CapabilityMissing(VmmError):
    """The host KVM lacks a capability the VMM needs."""


class KvmIoctlError(VmmError):
    """A KVM ioctl failed; the message names the ioctl and errno."""

    def __init__(self, ioctl: str, errno_: int, detail: str = ""):
        import os

        self.ioctl = ioctl
        self.errno = errno_
        msg = f"{ioctl} failed: {os.strerror(errno_)} (errno {errno_})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


# --- guest memory -----------------------------------------------------------
class GuestMemoryError(VmmError):
    """An access outside the guest's RAM (nothing was read or written)."""


class GuestMemoryClosed(GuestMemoryError):
    """Guest RAM was released (the machine was stopped); nothing was read or written."""


class GuestOutOfMemory(VmmError):
    """The host could not reserve the guest RAM size asked for."""


# --- images and kernels ------------------------------------------------------
class ImageError(VmmError):
    """A kernel image, initrd, ELF, BTF or System.map is corrupt or unsupported."""


class SymbolNotFound(VmmError):
    """A kernel symbol name is unknown; the message suggests close names."""


class TypeNotFound(VmmError):
    """A BTF type name is unknown; the message suggests close names."""


class FieldPathError(VmmError):
    """A dotted field path does not exist in a type (names the failing component)."""


class TranslationError(VmmError):
    """A kernel virtual address could not be translated (names level and address)."""


class KernelFeatureMissing(VmmError):
    """The kernel lacks something asked for (no BTF, no sched_ext, no SCX_RQ_CLK_VALID)."""


class KernelStoreError(VmmError):
    """A kernel could not be fetched, built or found (names the step; carries tool output)."""


# --- runtime / ops ------------------------------------------------------------
class FreezeTimeout(VmmError):
    """Not every vCPU parked within the rendezvous timeout (names which did not)."""


class TargetError(VmmError):
    """A KernelTarget could not be resolved or validated."""


class InvalidValue(VmmError, ValueError):
    """A value, address or size is out of range (names it and the range); also a
    ValueError, so `except ValueError` keeps working."""


class InvalidValueType(VmmError, TypeError):
    """A value has the wrong Python type (names it); also a TypeError."""


class BatchError(VmmError):
    """A batch entry failed validation; nothing in the batch was written.

    ``index`` is the entry's position in the batch, ``cause`` the underlying error.
    """

    def __init__(self, index: int, cause: Exception):
        self.index = index
        self.cause = cause
        super().__init__(f"batch entry {index}: {cause}")


class GuestBootError(VmmError):
    """The guest did not reach the expected point (message carries the console tail)."""


# --- machine configuration ------------------------------------------------------
class ConfigError(VmmError):
    """A Machine option is invalid (memory size, vCPU count, topology, command line)."""


# --- requests from the guest (vmm/runtime/requests.py) -------------------------------
class GuestRequestError(VmmError):
    """A request line from the guest is malformed, too long or names no handler; or a
    handler was registered wrongly. The guest gets the message in an error reply."""
