"""A kernel's configuration, and whether it can do what a job asks, checked before boot.

A kernel that lacks the serial console boots silently; one without sched_ext boots fine
and only fails at the injection minutes later on a PVM host. ``check()`` says so before
the VM starts, naming the CONFIG_ options. The config comes from the ``.config`` beside
the image or in its build tree, ``/boot/config-<release>``, the store's copy, or the
image itself when it was built with CONFIG_IKCONFIG (the gzip blob between the
``IKCFG_ST`` and ``IKCFG_ED`` markers of kernel/configs.c).
"""

from __future__ import annotations

import gzip
import mmap
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from vmm.errors import KernelFeatureMissing
from vmm.image.formats import extract_vmlinux  # the one decompressor

IKCFG_START = b"IKCFG_ST"
IKCFG_END = b"IKCFG_ED"

# What each need of a job requires: (option, why); each must be built in (y).
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "console": (("CONFIG_SERIAL_8250", "the 16550 serial port vmm's console is"),
                ("CONFIG_SERIAL_8250_CONSOLE", "kernel messages on ttyS0"),
                ("CONFIG_PRINTK", "kernel messages at all")),
    "initramfs": (("CONFIG_BLK_DEV_INITRD", "unpacking the initramfs vmm loads"),),
    "smp": (("CONFIG_SMP", "more than one CPU (--cpus > 1)"),),
    "btf": (("CONFIG_DEBUG_INFO_BTF", "the struct layouts vmm writes fields by"),),
    "sched_ext": (("CONFIG_SCHED_CLASS_EXT", "struct scx_rq and SCX_RQ_CLK_VALID"),),
    # The guest job (--exec; vmm/machine/guestjob.py): its /init is kernels/init/job-init.c,
    # a static ELF that mounts proc, sysfs and devtmpfs (tmpfs on /tmp only when it can)
    # and runs the job through busybox (static ELF too) with /dev/console as its stdio.
    "job": (("CONFIG_BLK_DEV_INITRD", "unpacking the job's initramfs"),
            ("CONFIG_RD_GZIP", "the job's initramfs is gzip-compressed"),
            ("CONFIG_BINFMT_ELF", "running the job's /init and busybox, static ELF programs"),
            ("CONFIG_PROC_FS", "/proc, which the job's init mounts"),
            ("CONFIG_SYSFS", "/sys, which the job's init mounts"),
            ("CONFIG_DEVTMPFS", "/dev, which the job's init mounts (devtmpfs)"),
            ("CONFIG_TTY", "/dev/console, the job's stdin, stdout and stderr")),
    # The schedulers of the kernel tree's tools/sched_ext (vmm.scxbuild.SCHEDULER_NEEDS
    # says which scheduler needs which; kernels/config/sched_ext-scx.fragment has all).
    "scx_tree": (("CONFIG_SCHED_CLASS_EXT", "sched_ext itself"),
                 ("CONFIG_BPF_SYSCALL", "loading the scheduler's BPF programs"),
                 ("CONFIG_BPF_JIT", "struct_ops: the kernel calls the scheduler through "
                                    "JIT trampolines"),
                 ("CONFIG_DEBUG_INFO_BTF", "the scheduler's vmlinux.h and CO-RE relocations"),
                 ("CONFIG_BPF_EVENTS", "the fentry program on bpf_scx_reg() that every tree "
                                       "scheduler loads, include/scx/common.bpf.h"),
                 ("CONFIG_FUNCTION_TRACER", "the fentry call site that program attaches to")),
    "scx_cgroups": (("CONFIG_CGROUP_SCHED", "scx_bpf_task_cgroup() and cpu_cgrp_id, which the "
                                            "scheduler's BPF code uses"),
                    ("CONFIG_EXT_GROUP_SCHED", "the cgroup_* ops sched_ext calls the scheduler "
                                               "through")),
    "bpf_arena": (("CONFIG_BPF_JIT", "BPF_MAP_TYPE_ARENA maps (the scheduler keeps its "
                                     "queues in one)"),),
}


# One line of a .config: "CONFIG_X=value" or "# CONFIG_X is not set", blanks around.
_LINE = re.compile(r"^[ \t\r\f\v]*(?:(CONFIG_[A-Za-z0-9_]+)=(.*?)|# (CONFIG_[A-Za-z0-9_]+) is not set)"
                   r"[ \t\r\f\v]*$", re.M)


def parse(text: str) -> dict[str, str]:
    """Kconfig text -> {CONFIG_X: value}; ``# CONFIG_X is not set`` becomes ``n``."""
    # One regex pass over the text, not a match per line: a config has thousands of lines
    # and this runs before every boot of a cached kernel (3x faster; it counts under the
    # SVM lane's emulated CPU).
    values: dict[str, str] = {}
    for m in _LINE.finditer(text):
        name, value, unset = m.groups()
        if name:
            values[name] = value
        else:
            values[unset] = "n"
    return values


def ikconfig(data: bytes | mmap.mmap) -> Optional[str]:
    """The config embedded with CONFIG_IKCONFIG in a vmlinux (or its bytes), or None."""
    start = data.find(IKCFG_START)
    while start >= 0:
        end = data.find(IKCFG_END, start)
        if end < 0:
            return None
        blob = bytes(data[start + len(IKCFG_START):end])
        try:
            return gzip.decompress(blob).decode("utf-8", "replace")
        except (OSError, EOFError, zlib.error):
            start = data.find(IKCFG_START, start + 1)  # the marker string itself, elsewhere
    return None


def ikconfig_of_file(path: str | os.PathLike) -> Optional[str]:
    """IKCONFIG of a vmlinux file, or of the vmlinux inside a bzImage."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0x202)
            is_bz = f.read(4) == b"HdrS"
            if head == b"\x7fELF":
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    return ikconfig(mm)
        if is_bz:
            return ikconfig(extract_vmlinux(Path(path).read_bytes()))
    except (OSError, ValueError):
        return None
    except Exception as e:  # an ImageError from a corrupt payload: no config, not fatal
        from vmm.errors import VmmError
        if isinstance(e, VmmError):
            return None
        raise
    return None


@dataclass
class KernelConfig:
    """A kernel's CONFIG_ values and where they were read from; check() names what a run lacks."""

    values: dict[str, str]
    source: str  # where it came from, for messages

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "KernelConfig":
        """A .config file, parsed."""
        return cls(parse(Path(path).read_text(errors="replace")), str(path))

    def enabled(self, option: str) -> bool:
        """True when `option` is built in (=y)."""
        # Built in: a module (m) cannot help before user space runs, and a PVM guest's
        # user space cannot load one.
        return self.values.get(option, "n") == "y"

    def missing(self, needs: Iterable[str]) -> list[tuple[str, str, str]]:
        """[(need, option, why)] of every option a need requires that is not set (an
        option two needs share, once)."""
        out, seen = [], set()
        for need in needs:
            for option, why in NEEDS[need]:
                if not self.enabled(option) and option not in seen:
                    seen.add(option)
                    out.append((need, option, why))
        return out

    def check(self, needs: Iterable[str]) -> None:
        """KernelFeatureMissing naming every missing CONFIG_ option (and why each is
        needed) when this config cannot do what ``needs`` ask."""
        missing = self.missing(needs)
        if missing:
            lines = ", ".join(f"{opt} ({why})" for _, opt, why in missing)
            raise KernelFeatureMissing(
                f"the kernel's config ({self.source}) lacks what this run needs: {lines}; "
                f"rebuild with these set to y (vmm kernel build merges them: "
                f"--source YOUR_TREE), or pass --no-config-check to boot anyway")


def find_config(config_path: Optional[str | os.PathLike],
                images: Iterable[Optional[str | os.PathLike]]) -> Optional[KernelConfig]:
    """The config file given/found with the kernel, else the IKCONFIG of its images."""
    if config_path is not None and Path(config_path).is_file():
        return KernelConfig.from_file(config_path)
    for image in images:
        if image is None:
            continue
        text = ikconfig_of_file(image)
        if text:
            return KernelConfig(parse(text), f"IKCONFIG in {image}")
    return None
