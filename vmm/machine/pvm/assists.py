"""Instructions a PVM host's emulator gives up on, performed from user space.

``assist_internal_error(vcpu, memory)`` handles ``int3`` (boot-time ``int3_selftest``
and every text patch) and ``ldmxcsr``/``stmxcsr`` (7.x FPU init, ``kernel_fpu_begin``).
It needs only the small ``AssistVcpu`` protocol below (vmm.kvm.Vcpu has it) and
``GuestMemoryAccess`` (vmm.kvm.GuestMemory), so tests drive it with a fake vCPU.
"""

from __future__ import annotations

import collections
import struct
from typing import Any, Protocol

from vmm.arch.x86.decode import decode_mxcsr, effective_address
from vmm.arch.x86.paging import read_code, read_virtual, write_virtual
from vmm.arch.x86.regs import BP_VECTOR, EFER_LMA, GP_VECTOR, MASK64
from vmm.errors import VmmError

KVM_INTERNAL_ERROR_EMULATION = 1
MXCSR_DEFAULT_MASK = 0xFFBF  # when the CPU reports none (FXSAVE's MXCSR_MASK = 0)

# MXCSR goes through KVM_GET_XSAVE/KVM_SET_XSAVE (Vcpu.get_xsave/set_xsave):
# KVM_GET_FPU/KVM_SET_FPU ignore the mxcsr field (it reads 0 and writes are dropped),
# so the legacy FXSAVE area of the XSAVE buffer is the only way in.
XSAVE_MXCSR = 24  # offsets in the legacy (FXSAVE) region
XSAVE_MXCSR_MASK = 28
XSAVE_XSTATE_BV = 512
XFEATURE_SSE = 1 << 1  # KVM takes MXCSR from the buffer only when FP or SSE is set

# How often each assist ran in this process (for diagnostics and benchmarks).
assist_counts: collections.Counter = collections.Counter()


class AssistVcpu(Protocol):
    """What the assists need of a stopped vCPU (vmm.kvm.Vcpu; a fake one in tests).

    regs: rip and rax..r15 (struct kvm_regs); sregs: cr0, cr3, cr4, efer, cs.l, fs.base,
    gs.base (struct kvm_sregs); events: .exception.{injected, pending, nr,
    has_error_code, error_code} (struct kvm_vcpu_events); xsave: the 4 KiB XSAVE area.
    An optional ``run`` (struct kvm_run) gives ``internal.suberror``.
    """

    def get_regs(self) -> Any: ...
    def set_regs(self, regs: Any) -> None: ...
    def get_sregs(self) -> Any: ...
    def get_vcpu_events(self) -> Any: ...
    def set_vcpu_events(self, events: Any) -> None: ...
    def get_xsave(self) -> bytearray: ...
    def set_xsave(self, data: bytes) -> None: ...


class GuestMemoryAccess(Protocol):
    """Guest-physical reads and writes; a VmmError outside RAM (vmm.kvm.GuestMemory)."""

    def read(self, gpa: int, n: int) -> bytes: ...
    def write(self, gpa: int, data: bytes) -> None: ...


def get_mxcsr(vcpu: AssistVcpu) -> tuple[int, int]:
    """(MXCSR, MXCSR_MASK) of a vCPU that is not running."""
    buf = vcpu.get_xsave()
    mxcsr, mask = struct.unpack_from("<II", buf, XSAVE_MXCSR)
    return mxcsr, mask or MXCSR_DEFAULT_MASK


def set_mxcsr(vcpu: AssistVcpu, value: int) -> None:
    """Set the vCPU's MXCSR through its XSAVE area (and mark the SSE state present)."""
    buf = vcpu.get_xsave()
    struct.pack_into("<I", buf, XSAVE_MXCSR, value)
    (xstate_bv,) = struct.unpack_from("<Q", buf, XSAVE_XSTATE_BV)
    struct.pack_into("<Q", buf, XSAVE_XSTATE_BV, xstate_bv | XFEATURE_SSE)
    vcpu.set_xsave(buf)


def _inject_exception(vcpu: AssistVcpu, vector: int, error_code: int | None = None) -> None:
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.pending = 0
    events.exception.nr = vector
    events.exception.has_error_code = 0 if error_code is None else 1
    events.exception.error_code = error_code or 0
    vcpu.set_vcpu_events(events)


def _is_emulation_failure(vcpu: AssistVcpu) -> bool:
    run = getattr(vcpu, "run", None)
    if run is None:
        return True  # no kvm_run to ask: the caller says it was an internal error
    try:
        return int(run.internal.suberror) == KVM_INTERNAL_ERROR_EMULATION
    except (AttributeError, TypeError):
        return True


def assist_internal_error(vcpu: AssistVcpu, memory: GuestMemoryAccess) -> bool:
    """Perform the instruction the host could not emulate; True when the guest may go on.

    Called on KVM_EXIT_INTERNAL_ERROR.  Handles suberror 1 (emulation failure) at:
    ``int3`` (RIP += 1, inject #BP, exactly what the CPU does for the trap) and
    ``ldmxcsr``/``stmxcsr`` (MXCSR via KVM_GET_XSAVE/KVM_SET_XSAVE, RIP past the
    instruction; reserved bits in a loaded value inject #GP(0) like the CPU).
    Anything else, or an operand that cannot be translated (a real CPU would raise
    #PF there): False, and the caller reports the failure.
    """
    if not _is_emulation_failure(vcpu):
        return False
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except VmmError:
        return False
    code = read_code(memory, sregs, regs.rip)
    if not code:
        return False
    if code[0] == 0xCC or code[:2] == b"\xcd\x03":  # int3 / int $3
        length = 1 if code[0] == 0xCC else 2
        regs.rip = (regs.rip + length) & MASK64  # #BP is a trap: it reports the next RIP
        vcpu.set_regs(regs)
        _inject_exception(vcpu, BP_VECTOR)
        assist_counts["int3"] += 1
        return True
    insn = decode_mxcsr(code)
    if insn is None or not sregs.efer & EFER_LMA or not sregs.cs.l:
        return False  # the decoder speaks 64-bit mode only
    next_rip = (regs.rip + insn.length) & MASK64
    addr = effective_address(insn.operand, regs, next_rip, sregs.fs.base, sregs.gs.base)
    try:
        mxcsr, valid_mask = get_mxcsr(vcpu)
        if insn.store:
            write_virtual(memory, sregs, addr, struct.pack("<I", mxcsr))
        else:
            (value,) = struct.unpack("<I", read_virtual(memory, sregs, addr, 4))
            if value & ~valid_mask:
                _inject_exception(vcpu, GP_VECTOR, 0)  # what the CPU does: RIP stays
                assist_counts[f"{insn.mnemonic}#GP"] += 1
                return True
            set_mxcsr(vcpu, value)
    except VmmError:  # TranslationError, GuestMemoryError, KvmIoctlError
        return False
    regs.rip = next_rip
    vcpu.set_regs(regs)
    assist_counts[insn.mnemonic] += 1
    return True
