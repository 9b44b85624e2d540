"""One vCPU's whole KVM state, read and written back (for snapshots).

`capture(vcpu)` reads every piece a guest needs to go on exactly where it was: the
general and special registers, FPU and XSAVE area, XCRs, the MSRs KVM saves
(KVM_GET_MSR_INDEX_LIST: the host's MSRs to save plus the ones KVM emulates, among them
the TSC and the kvm-clock MSRs), the local APIC page, the pending events, the MP state
and the debug registers. `apply(vcpu, state)` sets them in the order KVM needs (as
QEMU's kvm_arch_put_registers): registers, XSAVE, XCRs, special registers (APIC base
before the APIC page), MSRs, MP state, LAPIC, TSC deadline again (ignored until the
LAPIC timer is in TSC-deadline mode), events, debug registers.

The state is plain bytes per piece (the kernel's structure layouts), so a snapshot
stores it as it is and nothing here interprets guest-fed values beyond sizes.

The structures the C core's cdef lacks (LAPIC, XCRS, DEBUGREGS, the MSR index list) are
passed as raw buffers of their <linux/kvm.h> sizes through the core's generic ioctl,
with the request numbers built here (_IOC as in <asm-generic/ioctl.h>).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from vmm.errors import InvalidValue, KvmIoctlError
from vmm.kvm.native import check, native

KVMIO = 0xAE


def ioc(direction: int, nr: int, size: int) -> int:
    """_IOC(direction, KVMIO, nr, size): 1 write (to the kernel), 2 read, 3 both."""
    return direction << 30 | size << 16 | KVMIO << 8 | nr


LAPIC_SIZE = 1024  # struct kvm_lapic_state { char regs[1024]; }
XCRS_SIZE = 392  # u32 nr_xcrs, flags; struct kvm_xcr xcrs[16] (16 bytes each); u64 padding[16]
DEBUGREGS_SIZE = 128  # u64 db[4], dr6, dr7, flags, reserved[9]
KVM_GET_LAPIC = ioc(2, 0x8E, LAPIC_SIZE)
KVM_SET_LAPIC = ioc(1, 0x8F, LAPIC_SIZE)
KVM_GET_XCRS = ioc(2, 0xA6, XCRS_SIZE)
KVM_SET_XCRS = ioc(1, 0xA7, XCRS_SIZE)
KVM_GET_DEBUGREGS = ioc(2, 0xA1, DEBUGREGS_SIZE)
KVM_SET_DEBUGREGS = ioc(1, 0xA2, DEBUGREGS_SIZE)
KVM_GET_MSR_INDEX_LIST = ioc(3, 0x02, 4)  # struct kvm_msr_list { u32 nmsrs; u32 indices[]; }

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
# Always asked for, whatever the index list says (the list's emulated part has them on
# every KVM we know; asking twice is harmless).
ESSENTIAL_MSRS = (MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW)
MAX_MSRS = 4096
# MSRs a guest cannot go on without (clock, system-call entry, segment bases, PAT): a
# restore that cannot set one of these fails; any other MSR KVM refuses is reported.
REQUIRED_MSRS = frozenset((MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW,
                           0x174, 0x175, 0x176, 0x277, 0xC0000081, 0xC0000082, 0xC0000083,
                           0xC0000084, 0xC0000102, MSR_IA32_TSC_DEADLINE))

# The pieces in capture order; each is bytes (msrs: {index: value}; mp_state: int).
STRUCT_PIECES = {"regs": "struct kvm_regs *", "sregs": "struct kvm_sregs *",
                 "fpu": "struct kvm_fpu *", "events": "struct kvm_vcpu_events *"}


def _raw_ioctl(fd: int, request: int, buf: bytearray, name: str, detail: str) -> int:
    ffi, lib = native()
    return check(name, lib.vmm_ioctl(fd, request, ffi.from_buffer(buf)), detail)


def msr_index_list(kvm) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST on /dev/kvm: the MSRs KVM saves and emulates, in its order."""
    _, lib = native()
    n = 256
    while True:
        buf = bytearray(4 + 4 * n)
        buf[0:4] = n.to_bytes(4, "little")
        r = lib.vmm_ioctl(kvm.fd, KVM_GET_MSR_INDEX_LIST, native()[0].from_buffer(buf))
        if r == -errno.E2BIG and n < MAX_MSRS:
            n = min(int.from_bytes(buf[0:4], "little") or n * 2, MAX_MSRS)
            continue
        check("KVM_GET_MSR_INDEX_LIST", r)
        count = min(int.from_bytes(buf[0:4], "little"), n)
        return [int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "little") for i in range(count)]


@dataclass
class VcpuState:
    """Everything KVM holds for one vCPU, as bytes in the kernel's layouts."""

    index: int
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes | None
    xcrs: bytes | None
    msrs: dict[int, int]
    mp_state: int
    lapic: bytes
    events: bytes
    debugregs: bytes | None
    refused: list[str] = field(default_factory=list)  # pieces the host would not give

    @property
    def rip(self) -> int:
        """The RIP these registers hold."""
        return int.from_bytes(self.regs[16 * 8:17 * 8], "little")

    def to_json(self) -> dict:
        """A JSON-able dict (bytes as hex, MSR indices as strings)."""
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, bytes):
                out[k] = v.hex()
            elif k == "msrs":
                out[k] = {f"{i:#x}": val for i, val in v.items()}
            else:
                out[k] = v
        return out

    @classmethod
    def from_json(cls, d: dict) -> "VcpuState":
        """The inverse of to_json; InvalidValue naming a piece of the wrong kind or size."""
        try:
            kw = dict(d)
            for k in ("regs", "sregs", "fpu", "xsave", "xcrs", "lapic", "events", "debugregs"):
                kw[k] = None if kw.get(k) is None else bytes.fromhex(kw[k])
            kw["msrs"] = {int(i, 16): int(v) for i, v in kw["msrs"].items()}
            state = cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidValue(f"vCPU state: {type(e).__name__}: {e}") from None
        state.check_sizes()
        return state

    def check_sizes(self) -> None:
        """InvalidValue when a piece has not its structure's size (a corrupt snapshot)."""
        ffi, _ = native()
        want = {k: ffi.sizeof(t[:-2]) for k, t in STRUCT_PIECES.items()}
        want.update(lapic=LAPIC_SIZE, xcrs=XCRS_SIZE, debugregs=DEBUGREGS_SIZE,
                    xsave=ffi.sizeof("struct kvm_xsave"))
        for k, size in want.items():
            v = getattr(self, k)
            if v is not None and len(v) != size:
                raise InvalidValue(f"vCPU {self.index} state: {k} is {len(v)} bytes, KVM's "
                                   f"structure is {size}: the snapshot is corrupt or from "
                                   "another build")


def _get_struct(vcpu, piece: str) -> bytes:
    ffi, _ = native()
    getter = {"regs": vcpu.get_regs, "sregs": vcpu.get_sregs, "fpu": vcpu.get_fpu,
              "events": vcpu.get_vcpu_events}[piece]
    s = getter()
    return bytes(ffi.buffer(s))


def _set_struct(vcpu, piece: str, data: bytes) -> None:
    ffi, _ = native()
    s = ffi.new(STRUCT_PIECES[piece])
    ffi.memmove(s, data, len(data))
    {"regs": vcpu.set_regs, "sregs": vcpu.set_sregs, "fpu": vcpu.set_fpu,
     "events": vcpu.set_vcpu_events}[piece](s)


def get_msrs_tolerant(vcpu, indices) -> tuple[dict[int, int], list[int]]:
    """The readable ones of `indices` and the list KVM refused (KVM_GET_MSRS stops at
    the first MSR it cannot read; that one is left out and the rest asked again)."""
    ffi, lib = native()
    values, refused = {}, []
    todo = list(dict.fromkeys(indices))
    while todo:
        m = ffi.new("struct kvm_msrs *", {"nmsrs": len(todo), "entries": len(todo)})
        for i, idx in enumerate(todo):
            m.entries[i].index = idx
        got = check("KVM_GET_MSRS", lib.vmm_ioctl(vcpu.fd, lib.KVM_GET_MSRS, m),
                    f"vCPU {vcpu.index}")
        for i in range(got):
            values[m.entries[i].index] = m.entries[i].data
        if got < len(todo):
            refused.append(todo[got])
        todo = todo[got + 1:]
    return values, refused


def set_msrs_tolerant(vcpu, values: dict[int, int]) -> list[int]:
    """Sets `values` in order; KVM_SET_MSRS stops at the first MSR it refuses: that one
    is left out and the rest set. Returns the refused indices."""
    ffi, lib = native()
    refused = []
    items = list(values.items())
    while items:
        m = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (idx, val) in enumerate(items):
            m.entries[i].index, m.entries[i].data = idx, val
        done = check("KVM_SET_MSRS", lib.vmm_ioctl(vcpu.fd, lib.KVM_SET_MSRS, m),
                     f"vCPU {vcpu.index}")
        if done < len(items):
            refused.append(items[done][0])
        items = items[done + 1:]
    return refused


def _raw_get(vcpu, request: int, size: int, name: str) -> bytes:
    buf = bytearray(size)
    _raw_ioctl(vcpu.fd, request, buf, name, f"vCPU {vcpu.index}")
    return bytes(buf)


def capture(vcpu, msr_indices) -> VcpuState:
    """Every piece of `vcpu`'s state. The vCPU must not be inside KVM_RUN (frozen, or
    not started). A piece the host refuses (XSAVE, XCRS, DEBUGREGS) is None and named in
    .refused; the rest are required."""
    refused: list[str] = []

    def optional(fn, name):
        try:
            return fn()
        except KvmIoctlError as e:
            refused.append(f"{name}: {e}")
            return None

    xsave = optional(lambda: bytes(vcpu.get_xsave()), "KVM_GET_XSAVE")
    xcrs = optional(lambda: _raw_get(vcpu, KVM_GET_XCRS, XCRS_SIZE, "KVM_GET_XCRS"),
                    "KVM_GET_XCRS")
    debugregs = optional(lambda: _raw_get(vcpu, KVM_GET_DEBUGREGS, DEBUGREGS_SIZE,
                                          "KVM_GET_DEBUGREGS"), "KVM_GET_DEBUGREGS")
    msrs, bad = get_msrs_tolerant(vcpu, list(msr_indices) + list(ESSENTIAL_MSRS))
    if bad:
        refused.append("KVM_GET_MSRS refused " + ", ".join(f"{i:#x}" for i in bad))
    return VcpuState(
        index=vcpu.index,
        regs=_get_struct(vcpu, "regs"), sregs=_get_struct(vcpu, "sregs"),
        fpu=_get_struct(vcpu, "fpu"), xsave=xsave, xcrs=xcrs, msrs=msrs,
        mp_state=vcpu.get_mp_state(),
        lapic=_raw_get(vcpu, KVM_GET_LAPIC, LAPIC_SIZE, "KVM_GET_LAPIC"),
        events=_get_struct(vcpu, "events"), debugregs=debugregs, refused=refused)


# struct kvm_vcpu_events: exception.injected at byte 0, exception.pending at byte 3,
# flags (a u32) at byte 20; KVM_VCPUEVENT_VALID_PAYLOAD is 0x10 in flags.
_EVENTS_FLAGS = 20
_VALID_PAYLOAD = 0x10


def events_as_restored(events: bytes) -> bytes:
    """The events KVM reports after KVM_SET_VCPU_EVENTS of `events`. Without
    KVM_CAP_EXCEPTION_PAYLOAD (we do not enable it, nor does the flag appear) KVM's ABI
    reports an exception raised but not yet delivered as both pending and injected,
    and a set folds it into injected: it is delivered on the next entry either way,
    with its payload (CR2, DR6) already written by the get (Documentation/virt/kvm/api.rst,
    KVM_GET_VCPU_EVENTS). So a capture taken while a fault was in flight reads back with
    pending 0; every other byte round-trips."""
    flags = int.from_bytes(events[_EVENTS_FLAGS:_EVENTS_FLAGS + 4], "little")
    if flags & _VALID_PAYLOAD or not events[3]:
        return events
    out = bytearray(events)
    out[0], out[3] = 1, 0
    return bytes(out)


def apply(vcpu, state: VcpuState) -> list[int]:
    """Sets `state` on `vcpu` (not inside KVM_RUN) in the order KVM needs; KvmIoctlError
    naming the ioctl (or required MSR) that refused. Returns the other MSRs KVM refused
    (left at their reset values)."""
    state.check_sizes()
    _set_struct(vcpu, "regs", state.regs)
    if state.xsave is not None:
        vcpu.set_xsave(state.xsave)
    else:
        _set_struct(vcpu, "fpu", state.fpu)
    if state.xcrs is not None:
        _raw_ioctl(vcpu.fd, KVM_SET_XCRS, bytearray(state.xcrs), "KVM_SET_XCRS",
                   f"vCPU {vcpu.index}")
    _set_struct(vcpu, "sregs", state.sregs)
    # The TSC first: KVM derives the guest's TSC offset from it, and the deadline and
    # kvm-clock MSRs are read against it.
    msrs = dict(state.msrs)
    first = {i: msrs.pop(i) for i in (MSR_IA32_TSC,) if i in msrs}
    refused = set_msrs_tolerant(vcpu, {**first, **msrs})
    required = [i for i in refused if i in REQUIRED_MSRS]
    if required:
        raise KvmIoctlError("KVM_SET_MSRS", errno.EINVAL, f"vCPU {vcpu.index}: MSR(s) "
                            + ", ".join(f"{i:#x}" for i in required) + " not writable")
    vcpu.set_mp_state(state.mp_state)
    _raw_ioctl(vcpu.fd, KVM_SET_LAPIC, bytearray(state.lapic), "KVM_SET_LAPIC",
               f"vCPU {vcpu.index}")
    if MSR_IA32_TSC_DEADLINE in state.msrs:  # after the LAPIC: ignored before
        vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: state.msrs[MSR_IA32_TSC_DEADLINE]})
    _set_struct(vcpu, "events", state.events)
    if state.debugregs is not None:
        _raw_ioctl(vcpu.fd, KVM_SET_DEBUGREGS, bytearray(state.debugregs),
                   "KVM_SET_DEBUGREGS", f"vCPU {vcpu.index}")
    return refused
