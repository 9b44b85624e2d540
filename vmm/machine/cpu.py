"""Boot vCPU state for the Linux 64-bit boot protocol, CPUID and boot MSRs.

The boot vCPU starts in long mode as boot.rst's "64-bit boot protocol" asks: paging on
with an identity map covering the kernel, zero page and command line; CS a 64-bit code
segment and DS/ES/SS a flat data segment (__BOOT_CS 0x10 and __BOOT_DS 0x18 as in the
kernel's own boot GDT); RSI = the zero page; interrupts off. Application processors stay
in KVM's INIT-wait state until the guest starts them with INIT/SIPI.

The pure parts (GDT bytes, register values, CPUID rewriting) take plain data and are
unit-tested; `setup_boot_vcpu`/`setup_vcpu_cpuid` apply them through vmm.kvm.Vcpu.
"""

from __future__ import annotations

import functools
import operator
import struct

from vmm.arch.x86.regs import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME,
                               MISC_ENABLE_FAST_STRING, MSR_CSTAR, MSR_IA32_MISC_ENABLE,
                               MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP, MSR_IA32_SYSENTER_ESP,
                               MSR_IA32_TSC, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_MTRR_DEF_TYPE,
                               MSR_STAR, MSR_SYSCALL_MASK, MTRR_ENABLE, MTRR_TYPE_WRBACK,
                               RFLAGS_RESERVED)
from vmm.errors import KvmIoctlError
from vmm.machine import layout as L
from vmm.machine.topology import Topology

BOOT_CS = 0x10
BOOT_DS = 0x18
# TR is loaded from KVM's segment cache only (no TSS descriptor in the GDT: the GDT ends
# at 0x520 where the IDT begins). VM entry checks the cached TR (present, busy 64-bit TSS),
# not the GDT; the kernel loads its own GDT and TSS long before it could reload TR.
BOOT_TSS = 0x0

BOOT_CR0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
BOOT_CR4 = CR4_PAE
BOOT_EFER = EFER_LME | EFER_LMA

# Segment descriptor access types
SEG_TYPE_CODE_XR_ACCESSED = 0xB
SEG_TYPE_DATA_RW_ACCESSED = 0x3
SEG_TYPE_TSS_BUSY = 0xB

# MSRs set at boot (the values Firecracker documents for its boot vCPU: facts only).

BOOT_MSRS: dict[int, int] = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,  # all memory write-back by default
}

FPU_CONTROL_WORD = 0x37F  # x87 default after FNINIT
MXCSR_DEFAULT = 0x1F80  # all SSE exceptions masked


# --- GDT ---------------------------------------------------------------------------------------
def gdt_entry(flags: int, base: int, limit: int) -> int:
    """An 8-byte segment descriptor from packed flags (the 0xAF9B style), base and limit."""
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0x00FFFFFF) << 16) | (limit & 0xFFFF))


GDT_FLAGS_CODE64 = 0xA09B  # G, L, P, DPL0, S, code execute/read accessed
GDT_FLAGS_DATA = 0xC093  # G, D/B, P, DPL0, S, data read/write accessed
TSS_LIMIT = 0x67


def gdt_bytes() -> bytes:
    """null, null, __BOOT_CS (0x10), __BOOT_DS (0x18): 32 bytes, [0x500, 0x520)."""
    entries = [0, 0, gdt_entry(GDT_FLAGS_CODE64, 0, 0xFFFFF), gdt_entry(GDT_FLAGS_DATA, 0, 0xFFFFF)]
    return b"".join(struct.pack("<Q", e) for e in entries)


def _segment(seg, selector: int, seg_type: int, *, code: bool = False, system: bool = False,
             limit: int = 0xFFFFFFFF, granular: bool = True) -> None:
    seg.base = 0
    seg.limit = limit
    seg.selector = selector
    seg.type = seg_type
    seg.present = 1
    seg.dpl = 0
    seg.db = 0 if code or system else 1
    seg.s = 0 if system else 1
    seg.l = 1 if code else 0
    seg.g = 1 if granular else 0
    seg.avl = 0
    seg.unusable = 0


def configure_sregs(sregs) -> None:
    """Long mode with the identity map, segments from the boot GDT (a cffi kvm_sregs)."""
    _segment(sregs.cs, BOOT_CS, SEG_TYPE_CODE_XR_ACCESSED, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, BOOT_DS, SEG_TYPE_DATA_RW_ACCESSED)
    _segment(sregs.tr, BOOT_TSS, SEG_TYPE_TSS_BUSY, system=True, limit=TSS_LIMIT, granular=False)
    sregs.gdt.base = L.GDT_START
    sregs.gdt.limit = len(gdt_bytes()) - 1
    sregs.idt.base = L.IDT_START
    sregs.idt.limit = 7  # one empty gate: any exception before the kernel's IDT is fatal
    sregs.cr0 = BOOT_CR0
    sregs.cr3 = L.PML4_START
    sregs.cr4 = BOOT_CR4
    sregs.efer = BOOT_EFER


def configure_regs(regs, entry: int, zero_page: int = L.ZERO_PAGE_START) -> None:
    regs.rflags = RFLAGS_RESERVED
    regs.rip = entry
    regs.rsi = zero_page
    regs.rsp = L.BOOT_STACK_TOP
    regs.rbp = L.BOOT_STACK_TOP


# --- CPUID: the topology's leaves are vmm/machine/cpuid_topology.py (re-exported) ----------------
from vmm.machine.cpuid_topology import (AMD_L1_CACHE, AMD_L1_TLB, AMD_L2_CACHE,  # noqa: E402,F401
                                        AMD_L2_L3_ASSOC_SEE_8000001D, AMD_VENDORS, CACHES,
                                        CPUID_80000001_ECX_TOPOEXT, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                                        X2APIC_LEVEL_CORE, X2APIC_LEVEL_SMT,
                                        complete_amd_cache_leaves, cpuid_entries_for_vcpu,
                                        cpuid_vendor)

_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
_CPUID_VALUES = operator.itemgetter(*_CPUID_FIELDS)


@functools.cache
def _entry_layout():
    """(size of one kvm_cpuid_entry2, its seven u32 fields' struct format), from the
    compiled header: the fields lie at 0, 4, ... 24 in KVM's ABI."""
    from vmm.kvm.native import native

    ffi, _ = native()
    offsets = [ffi.offsetof("struct kvm_cpuid_entry2", f) for f in _CPUID_FIELDS]
    assert offsets == list(range(0, 28, 4)), offsets
    return ffi.sizeof("struct kvm_cpuid_entry2"), struct.Struct("<7I")


def cpuid_to_list(cpuid) -> list[dict]:
    from vmm.kvm.native import native

    ffi, _ = native()
    size, fields = _entry_layout()
    raw = ffi.buffer(cpuid.entries, size * cpuid.nent)
    return [dict(zip(_CPUID_FIELDS, fields.unpack_from(raw, i * size))) for i in range(cpuid.nent)]


def cpuid_from_list(entries: list[dict]):
    """A `struct kvm_cpuid2 *` of `entries`, packed in one pass (a restore sets one per
    vCPU: field by field through cffi took 1.8 ms a vCPU in the SVM lane)."""
    from vmm.kvm.native import native

    ffi, _ = native()
    size, fields = _entry_layout()
    data = bytearray(size * len(entries))
    for i, e in enumerate(entries):
        fields.pack_into(data, i * size, *_CPUID_VALUES(e))
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    ffi.memmove(cpuid.entries, data, len(data))
    return cpuid


# --- paravirtual CPUID: what QEMU gives a KVM guest -------------------------------------------
# KVM_GET_SUPPORTED_CPUID lists what KVM can do, not a finished guest CPUID: like QEMU,
# the VMM adds what KVM supports without reporting it and keeps out what needs the VMM's
# cooperation. Without the hypervisor bit Linux never looks for the KVM signature, so it
# finds neither kvm-clock nor the TSC frequency ("Fast TSC calibration failed").
CPUID_1_ECX_TSC_DEADLINE = 1 << 24  # emulated by KVM's LAPIC (KVM_CAP_TSC_DEADLINE_TIMER)
CPUID_1_ECX_HYPERVISOR = 1 << 31  # "running under a hypervisor": look at 0x40000000
CPUID_APM_EDX_INVTSC = 1 << 8  # 0x80000007 EDX: invariant TSC
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_CPUID_TIMING = 0x40000010  # the hypervisor timing leaf: EAX TSC kHz, EBX APIC bus kHz
KVM_SIGNATURE = struct.unpack("<3I", b"KVMKVMKVM\0\0\0")  # EBX, ECX, EDX
APIC_BUS_KHZ = 1_000_000  # KVM's local APIC timer counts at 1 GHz
# KVM_CPUID_FEATURES EAX bits (Documentation/virt/kvm/x86/cpuid.rst).
KVM_FEATURE_CLOCKSOURCE = 1 << 0
KVM_FEATURE_CLOCKSOURCE2 = 1 << 3
KVM_FEATURE_STEAL_TIME = 1 << 5
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_FEATURE_MSI_EXT_DEST_ID = 1 << 15  # needs the VMM's x2APIC API set-up (>255 APIC ids)
KVM_FEATURE_HC_MAP_GPA_RANGE = 1 << 16  # encrypted guests: hypercall exits to the VMM
KVM_FEATURE_MIGRATION_CONTROL = 1 << 17  # encrypted guests' live migration
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 1 << 24
# Features KVM may support that only work with the VMM's help, which this VMM does not give.
KVM_FEATURES_NEEDING_VMM = (KVM_FEATURE_MSI_EXT_DEST_ID | KVM_FEATURE_HC_MAP_GPA_RANGE
                            | KVM_FEATURE_MIGRATION_CONTROL)


def _leaf(function: int, eax=0, ebx=0, ecx=0, edx=0) -> dict:
    return {"function": function, "index": 0, "flags": 0, "eax": eax, "ebx": ebx, "ecx": ecx,
            "edx": edx}


def paravirt_cpuid(entries: list[dict], tsc_khz: int | None = None,
                   tsc_deadline: bool = False) -> list[dict]:
    """The guest CPUID for every vCPU (before the per-vCPU topology rewrite), from the
    host-supported list, as QEMU composes it for a KVM guest:

    - leaf 1 ECX: the hypervisor bit, and TSC-deadline when KVM emulates it
      (`tsc_deadline`: KVM_CAP_TSC_DEADLINE_TIMER); KVM supports both without always
      listing them;
    - 0x40000000 "KVMKVMKVM" and 0x40000001 (kvm-clock: CLOCKSOURCE2, stable bit, PV
      EOI/unhalt...), KVM's list minus the features that need the VMM's help;
    - with the TSC frequency known (`tsc_khz` from KVM_GET_TSC_KHZ) and an invariant
      TSC (0x80000007 EDX[8], kept as KVM reports it), the timing leaf 0x40000010
      (EAX = TSC kHz, EBX = APIC bus kHz), as QEMU adds it with +invtsc.

    The guest then finds kvm-clock, and its TSC frequency through it ("tsc: Detected
    NNNN.NNN MHz processor") instead of calibrating against the PIT.
    """
    out = [dict(e) for e in entries]
    by_fn = {e["function"]: e for e in out if e["index"] == 0}
    if 1 in by_fn:
        by_fn[1]["ecx"] |= CPUID_1_ECX_HYPERVISOR | (CPUID_1_ECX_TSC_DEADLINE if tsc_deadline else 0)
    sig = by_fn.get(KVM_CPUID_SIGNATURE)
    if sig is None:
        sig = _leaf(KVM_CPUID_SIGNATURE)
        out.append(sig)
    sig["ebx"], sig["ecx"], sig["edx"] = KVM_SIGNATURE
    features = by_fn.get(KVM_CPUID_FEATURES)
    if features is None:  # KVM listed no paravirtual features: offer none
        features = _leaf(KVM_CPUID_FEATURES)
        out.append(features)
    features["eax"] &= ~KVM_FEATURES_NEEDING_VMM
    max_leaf = KVM_CPUID_FEATURES
    apm = by_fn.get(0x80000007)
    invtsc = apm is not None and bool(apm["edx"] & CPUID_APM_EDX_INVTSC)
    out = [e for e in out if e["function"] != KVM_CPUID_TIMING]
    if tsc_khz and invtsc:
        out.append(_leaf(KVM_CPUID_TIMING, eax=tsc_khz, ebx=APIC_BUS_KHZ))
        max_leaf = KVM_CPUID_TIMING
    sig["eax"] = max_leaf
    return out


def describe_paravirt(entries: list[dict]) -> str:
    """One line on what the guest is told about time (for Machine.notes)."""
    by_fn = {e["function"]: e for e in entries if e["index"] == 0}
    features = by_fn.get(KVM_CPUID_FEATURES, {}).get("eax", 0)
    timing = by_fn.get(KVM_CPUID_TIMING)
    names = [n for bit, n in ((KVM_FEATURE_CLOCKSOURCE2, "kvm-clock"),
                              (KVM_FEATURE_CLOCKSOURCE_STABLE_BIT, "stable bit"),
                              (KVM_FEATURE_STEAL_TIME, "steal time"),
                              (KVM_FEATURE_PV_UNHALT, "PV unhalt")) if features & bit]
    tsc = f"TSC {timing['eax']} kHz in 0x40000010" if timing else "no timing leaf"
    return f"paravirt CPUID: KVM signature, {', '.join(names) or 'no features'}; {tsc}"


# --- applying it ------------------------------------------------------------------------------
def setup_vcpu_cpuid(vcpu, supported: list[dict], topology: Topology) -> None:
    """`supported`: the list every vCPU shares (paravirt_cpuid's result)."""
    vcpu.set_cpuid2(cpuid_from_list(cpuid_entries_for_vcpu(supported, vcpu.index, topology)))


def set_boot_msrs(vcpu) -> list[int]:
    """Sets BOOT_MSRS; returns the indices KVM refused (a host may not expose all of them)."""
    try:
        vcpu.set_msrs(BOOT_MSRS)
        return []
    except KvmIoctlError:
        refused = []
        for index, value in BOOT_MSRS.items():
            try:
                vcpu.set_msrs({index: value})
            except KvmIoctlError:
                refused.append(index)
        return refused


def setup_fpu(vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = FPU_CONTROL_WORD
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)


def setup_boot_vcpu(vcpu, entry: int) -> None:
    """Registers of the boot vCPU: long mode at `entry` with RSI = the zero page."""
    sregs = vcpu.get_sregs()
    configure_sregs(sregs)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    configure_regs(regs, entry)
    vcpu.set_regs(regs)
