"""sched_ext's own state, read from guest memory through BTF: is a scheduler attached,
which one, did it exit and why. Never from the console, never from an agent in the guest.

Supported layout (checked against Linux 7.3's kernel/sched/ext/{ext.c,internal.h}; the
same names since the scx_sched rework of 6.16):

- ``struct scx_sched __rcu *scx_root``: the attached root scheduler, NULL when none;
  ``scx_root->ops.name`` (``char[SCX_OPS_NAME_LEN]``), ``->exit_kind`` (``atomic_t``, the
  claimed ``enum scx_exit_kind``: set first, by scx_claim_exit), ``->exit_info`` (``struct
  scx_exit_info *``: ``kind``, ``exit_cpu``, ``exit_code``, ``reason`` (``const char *``; a
  ``char[]`` is read in place too), ``msg`` (``char *``, ``SCX_EXIT_MSG_LEN`` bytes)), and
  ``->watchdog_timeout`` (jiffies; a kernel with the global ``scx_watchdog_timeout``
  instead is read there);
- ``static atomic_t scx_enable_state_var``: ``enum scx_enable_state`` (SCX_ENABLING,
  SCX_ENABLED, SCX_DISABLING, SCX_DISABLED -> "enabling", "enabled", ... as the
  kernel's own ``scx_enable_state_str[]`` and /sys/kernel/sched_ext/state name them).

Refused with KernelFeatureMissing naming what is missing: a kernel without sched_ext
(no ``scx_root``, no ``scx_ops``), the pre-6.16 layout (global ``scx_ops``,
``scx_exit_info``, ``scx_ops_enable_state_var``, no ``scx_root``), a kernel without BTF,
or a BTF without one of the fields above.

Ordering (x86, whose stores are seen in program order): the kernel claims
``sch->exit_kind``, writes the message (vscnprintf into ``exit_info->msg``), then sets
``exit_info->kind`` and ``->reason`` (scx_finish_exit). So ``exit_kind`` is reported as
soon as it is claimed, but ``exit_reason``/``exit_msg`` only once ``exit_info->kind`` is
set: a message read before that could be half written. The disable work then swaps
``sch->exit_kind`` to ``SCX_EXIT_DONE`` and writes the kind it took into
``exit_info->kind`` again (scx_disable_workfn; a non-error exit such as
``SCX_EXIT_UNREG`` gets its ``exit_info`` only there), so once ``exit_info->kind`` is set
it names the exit, not the claimed word (seen in the SVM lane: scx_simple's detach read
as ``SCX_EXIT_DONE`` before this). When the exit is over the kernel
clears ``scx_root`` and frees the scheduler: from then on nothing of that exit is left
in memory to read (``ScxView.wait_for_exit`` polls often enough to catch it, and keeps
the last exit it saw as ``ScxView.last_exit``).

Consistency: read while every vCPU is parked (``with m.freeze():``, or
``state(freeze=True)``) everything is one instant. Without a freeze each pointer
(``scx_root``, ``exit_info``, the strings') is read once and used for everything under
it, and afterwards the words that decide the answer (enable state, ``scx_root``,
``exit_kind``, ``exit_info``, its ``kind``/``reason``/``msg`` pointers) are read again;
any change and the whole read is redone (a few times; then ``consistent=False``).

The reader needs only ``live.kernel`` (symbols, BTF), ``live.symbol_address(name)`` and
``live.read_kva(kva, n)`` (vmm.kernel.live.LiveKernel has them; strings are read
through its page walk, bounded in length).
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from vmm.errors import KernelFeatureMissing, VmmError
from vmm.kernel.btf import ARRAY, ENUM, ENUM64, PTR

#: enum scx_enable_state when BTF does not list it (the values of 6.16 .. 7.3).
DEFAULT_ENABLE_STATES = {0: "enabling", 1: "enabled", 2: "disabling", 3: "disabled"}
REASON_MAX = 256          # exit_info->reason: a short constant string (scx_exit_reason())
DEFAULT_MSG_LEN = 1024    # SCX_EXIT_MSG_LEN when BTF does not have it
RETRIES = 8               # unfrozen reads redone at most this often


class ScxTimeout(VmmError, TimeoutError):
    """wait_for_exit's timeout passed before the scheduler exited."""


@dataclass(frozen=True)
class ScxState:
    """sched_ext's state at one instant.

    state: "enabling" | "enabled" | "disabling" | "disabled" (the kernel's names);
    ops: the attached (root) scheduler's name, None when none is attached;
    exit_kind: the kernel's enum scx_exit_kind name ("SCX_EXIT_ERROR_STALL"), None for
    SCX_EXIT_NONE or without a scheduler; exit_reason / exit_msg: exit_info's strings
    once the kernel has finished writing them (None before); exit_code / exit_cpu the
    same way; sched: scx_root's value (a kernel virtual address, None when NULL);
    consistent: False when unfrozen reads kept changing under us (see the module doc).
    """

    state: str
    ops: Optional[str]
    exit_kind: Optional[str]
    exit_reason: Optional[str]
    exit_msg: Optional[str]
    exit_code: Optional[int] = None
    exit_cpu: Optional[int] = None
    sched: Optional[int] = None
    consistent: bool = True

    @property
    def exited(self) -> bool:
        """True once an exit kind is claimed."""
        return self.exit_kind is not None

    @property
    def attached(self) -> bool:
        """True while a scheduler is attached (scx_root not NULL)."""
        return self.sched is not None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def describe(self) -> str:
        """One line: state, scheduler, exit."""
        text = f"sched_ext {self.state}"
        if self.ops is not None:
            text += f", scheduler {self.ops!r}"
        if self.exit_kind is not None:
            text += f", exit {self.exit_kind}"
            if self.exit_reason:
                text += f" ({self.exit_reason})"
            if self.exit_msg:
                text += f": {self.exit_msg}"
        if not self.consistent:
            text += " [read while it changed]"
        return text


@dataclass(frozen=True)
class ScxLayout:
    """Where everything is, from symbols and BTF (no guest memory read)."""

    name_off: int
    name_len: int
    exit_info_off: int
    exit_kind_off: Optional[int]          # scx_sched.exit_kind (atomic_t), if present
    watchdog_off: Optional[int]           # scx_sched.watchdog_timeout, if present
    watchdog_global: Optional[str]        # else the global's name (older layouts)
    ei_size: int
    ei_kind_off: int
    ei_cpu_off: Optional[int]
    ei_code_off: Optional[int]
    ei_reason_off: int
    ei_reason_inline: int                 # > 0: reason is a char[n] in place; 0: a pointer
    ei_msg_off: int
    ei_msg_inline: int
    msg_len: int
    states: dict[int, str] = field(default_factory=dict)
    exit_kinds: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of(cls, kernel) -> "ScxLayout":
        """The layout of ``kernel`` (a vmm.kernel.Kernel); KernelFeatureMissing naming
        what this kernel lacks."""
        syms = kernel.symbols
        if "scx_root" not in syms:
            older = [n for n in ("scx_ops", "scx_exit_info", "scx_ops_enable_state_var") if n in syms]
            if older:
                raise KernelFeatureMissing(
                    f"this kernel's sched_ext has the pre-6.16 layout ({', '.join(older)}, no "
                    f"scx_root): not supported; m.scx reads the 6.16+ layout (scx_root -> "
                    f"struct scx_sched, scx_enable_state_var), e.g. Linux 7.3")
            raise KernelFeatureMissing(
                "this kernel has no sched_ext (no scx_root symbol): build it with "
                "CONFIG_SCHED_CLASS_EXT=y (kernels/config/sched_ext.fragment)")
        if "scx_enable_state_var" not in syms:
            raise KernelFeatureMissing("this kernel has scx_root but no scx_enable_state_var: "
                                       "a sched_ext layout m.scx does not know")
        if not kernel.has_btf:
            raise KernelFeatureMissing("this kernel has no BTF (CONFIG_DEBUG_INFO_BTF): the "
                                       "sched_ext state is read through it")
        btf = kernel.btf

        def fld(struct_name: str, path: str, optional: bool = False):
            try:
                return btf.field(struct_name, path)
            except VmmError as e:
                if optional:
                    return None
                raise KernelFeatureMissing(f"sched_ext state: {struct_name} has no {path!r} in "
                                           f"this kernel's BTF ({e})") from None

        def inline_len(f) -> int:
            t = btf.resolve(f.type)
            if t.kind == ARRAY:
                return f.size
            if t.kind == PTR:
                return 0
            raise KernelFeatureMissing(f"sched_ext state: a string field is "
                                       f"{btf.type_name(t)}, neither char * nor char[]")

        name = fld("struct scx_sched", "ops.name")
        info = fld("struct scx_sched", "exit_info")
        if btf.resolve(info.type).kind != PTR:
            raise KernelFeatureMissing("sched_ext state: scx_sched.exit_info is not a pointer "
                                       "in this kernel's BTF")
        kind = fld("struct scx_sched", "exit_kind", optional=True)
        watchdog = fld("struct scx_sched", "watchdog_timeout", optional=True)
        reason = fld("struct scx_exit_info", "reason")
        msg = fld("struct scx_exit_info", "msg")
        ei_kind = fld("struct scx_exit_info", "kind")
        ei_cpu = fld("struct scx_exit_info", "exit_cpu", optional=True)
        ei_code = fld("struct scx_exit_info", "exit_code", optional=True)
        try:
            msg_len = btf.enum_value("SCX_EXIT_MSG_LEN")
        except VmmError:
            msg_len = DEFAULT_MSG_LEN
        return cls(
            name_off=name.offset, name_len=name.size, exit_info_off=info.offset,
            exit_kind_off=kind.offset if kind is not None and kind.size == 4 else None,
            watchdog_off=watchdog.offset if watchdog is not None else None,
            watchdog_global="scx_watchdog_timeout" if watchdog is None and "scx_watchdog_timeout" in syms else None,
            ei_size=btf.sizeof("struct scx_exit_info"), ei_kind_off=ei_kind.offset,
            ei_cpu_off=ei_cpu.offset if ei_cpu is not None else None,
            ei_code_off=ei_code.offset if ei_code is not None else None,
            ei_reason_off=reason.offset, ei_reason_inline=inline_len(reason),
            ei_msg_off=msg.offset, ei_msg_inline=inline_len(msg), msg_len=msg_len,
            states=_enum_names(btf, "enum scx_enable_state", strip="SCX_", lower=True)
            or dict(DEFAULT_ENABLE_STATES),
            exit_kinds=_enum_names(btf, "enum scx_exit_kind"))

    def state_name(self, value: int) -> str:
        """"enabled" for SCX_ENABLED's value, "unknown (N)" for a value BTF does not name."""
        return self.states.get(value, f"unknown ({value})")

    def exit_kind_name(self, value: int) -> Optional[str]:
        """None for SCX_EXIT_NONE (0), else the enumerator's name."""
        if value == 0:
            return None
        return self.exit_kinds.get(value, f"SCX_EXIT_? ({value})")


def _enum_names(btf, type_name: str, strip: str = "", lower: bool = False) -> dict[int, str]:
    try:
        t = btf.type(type_name)
    except VmmError:
        return {}
    if t.kind not in (ENUM, ENUM64):
        return {}
    out = {}
    for e in t.enum_values:
        name = e.name[len(strip):] if strip and e.name.startswith(strip) else e.name
        out[e.value] = name.lower() if lower else name
    return out


def read_cstring(live, kva: int, limit: int) -> str:
    """The NUL-terminated string at kva, at most ``limit`` bytes, read a page at a time
    through live.read_kva (its page walk); undecodable bytes replaced."""
    out = bytearray()
    while len(out) < limit:
        chunk = min(limit - len(out), 0x1000 - (kva & 0xFFF))
        data = live.read_kva(kva, chunk)
        nul = data.find(b"\0")
        if nul >= 0:
            out += data[:nul]
            break
        out += data
        kva += chunk
    return out.decode("utf-8", errors="replace")


def _u32(b: bytes, off: int = 0) -> int:
    return struct.unpack_from("<I", b, off)[0]


def _s32(b: bytes, off: int = 0) -> int:
    return struct.unpack_from("<i", b, off)[0]


def _u64(b: bytes, off: int = 0) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def _s64(b: bytes, off: int = 0) -> int:
    return struct.unpack_from("<q", b, off)[0]


def _read_once(live, lay: ScxLayout, root: Optional[int] = None) -> tuple[ScxState, tuple]:
    """One pass: (state, the key words to re-check). ``root``: read that scx_sched
    instead of the one ``scx_root`` points to (the one a detach just unlinked)."""
    state_kva = live.symbol_address("scx_enable_state_var")
    state_v = _u32(live.read_kva(state_kva, 4))
    if root is None:
        root = _u64(live.read_kva(live.symbol_address("scx_root"), 8))
    state = lay.state_name(state_v)
    if root == 0:
        return ScxState(state, None, None, None, None), (state_v, 0)
    name = live.read_kva(root + lay.name_off, lay.name_len).split(b"\0", 1)[0]
    ops = name.decode("utf-8", errors="replace")
    claimed = _u32(live.read_kva(root + lay.exit_kind_off, 4)) if lay.exit_kind_off is not None else 0
    ei = _u64(live.read_kva(root + lay.exit_info_off, 8))
    key: tuple = (state_v, root, claimed, ei)
    kind_v, reason, msg, code, cpu = claimed, None, None, None, None
    if ei:
        blob = live.read_kva(ei, lay.ei_size)
        ei_kind = _u32(blob, lay.ei_kind_off)
        reason_p = 0 if lay.ei_reason_inline else _u64(blob, lay.ei_reason_off)
        msg_p = 0 if lay.ei_msg_inline else _u64(blob, lay.ei_msg_off)
        key += (ei_kind, reason_p, msg_p)
        # The disable work swaps sch->exit_kind to SCX_EXIT_DONE, then writes the kind it
        # took into exit_info->kind: that one names the exit once it is written.
        kind_v = ei_kind or claimed
        if ei_kind:  # written after the message: the strings are whole (module doc)
            if lay.ei_reason_inline:
                reason = blob[lay.ei_reason_off:lay.ei_reason_off + lay.ei_reason_inline] \
                    .split(b"\0", 1)[0].decode("utf-8", errors="replace")
            elif reason_p:
                reason = read_cstring(live, reason_p, REASON_MAX)
            if lay.ei_msg_inline:
                msg = blob[lay.ei_msg_off:lay.ei_msg_off + lay.ei_msg_inline] \
                    .split(b"\0", 1)[0].decode("utf-8", errors="replace")
            elif msg_p:
                msg = read_cstring(live, msg_p, lay.msg_len)
            if lay.ei_code_off is not None:
                code = _s64(blob, lay.ei_code_off)
            if lay.ei_cpu_off is not None:
                cpu = _s32(blob, lay.ei_cpu_off)
    return ScxState(state, ops, lay.exit_kind_name(kind_v), reason, msg, code, cpu, root), key


def _key_again(live, lay: ScxLayout, key: tuple) -> tuple:
    """The key words of _read_once read again (same pointers as the first pass)."""
    state_v = _u32(live.read_kva(live.symbol_address("scx_enable_state_var"), 4))
    root = _u64(live.read_kva(live.symbol_address("scx_root"), 8))
    if root == 0 or root != key[1]:
        return (state_v, root)
    claimed = _u32(live.read_kva(root + lay.exit_kind_off, 4)) if lay.exit_kind_off is not None else 0
    ei = _u64(live.read_kva(root + lay.exit_info_off, 8))
    again: tuple = (state_v, root, claimed, ei)
    if ei and ei == key[3]:
        blob = live.read_kva(ei, lay.ei_size)
        again += (_u32(blob, lay.ei_kind_off),
                  0 if lay.ei_reason_inline else _u64(blob, lay.ei_reason_off),
                  0 if lay.ei_msg_inline else _u64(blob, lay.ei_msg_off))
    return again


def read_state(live, layout: Optional[ScxLayout] = None, frozen: bool = False,
               retries: int = RETRIES) -> ScxState:
    """sched_ext's state through ``live`` (module doc). ``frozen``: the guest is parked, one
    pass is the answer; else each pass is re-checked and redone on a change."""
    lay = layout or ScxLayout.of(live.kernel)
    if frozen:
        return _read_once(live, lay)[0]
    last_error: Optional[VmmError] = None
    state = None
    for _ in range(max(1, retries)):
        try:
            state, key = _read_once(live, lay)
            if _key_again(live, lay, key) == key:
                return state
        except VmmError as e:  # a pointer freed and reused under us: read again
            last_error = e
    if state is None:
        raise VmmError(f"sched_ext state: every unfrozen read failed (last: {last_error}); "
                       f"read it frozen: m.scx.state(freeze=True)")
    return ScxState(**{**asdict(state), "consistent": False})
