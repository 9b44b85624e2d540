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

import struct

from vmm.arch.x86.regs import (CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME,
                               MISC_ENABLE_FAST_STRING, MSR_CSTAR, MSR_IA32_MISC_ENABLE,
                               MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP, MSR_IA32_SYSENTER_ESP,
                               MSR_IA32_TSC, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_MTRR_DEF_TYPE,
                               MSR_STAR, MSR_SYSCALL_MASK, MTRR_ENABLE, MTRR_TYPE_WRBACK,
                               RFLAGS_RESERVED)
from vmm.errors import KvmIoctlError
from vmm.machine import layout as L
from vmm.machine.tables import Topology

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


# --- CPUID ---------------------------------------------------------------------------------------
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # <linux/kvm.h>: the entry is for one subleaf (ECX)
X2APIC_LEVEL_SMT, X2APIC_LEVEL_CORE = 1, 2  # leaf 0xB/0x1F ECX[15:8] level types
CPUID_80000001_ECX_TOPOEXT = 1 << 22  # AMD: 0x8000001D cache and 0x8000001E topology leaves
AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")
# AMD's L1/L2 descriptions (0x80000005 ECX/EDX, 0x80000006 ECX) for a KVM that lists
# them empty: 32 KiB 8-way L1 data and instruction caches, 512 KiB 8-way L2 (0x6 is the
# "8-way" code of 0x80000006), 64-byte lines, one line per tag; L1 TLBs 64 entries fully
# associative (0xFF), as a recent AMD core reports them.
AMD_L1_TLB = 0xFF40FF40
AMD_L1_CACHE = (32 << 24) | (8 << 16) | (1 << 8) | 64
AMD_L2_CACHE = (512 << 16) | (0x6 << 12) | (1 << 8) | 64
AMD_L2_L3_ASSOC_SEE_8000001D = 0x9  # 0x80000006 associativity code: "read 0x8000001D"


def cpuid_vendor(entries: list[dict]) -> bytes:
    leaf0 = next((e for e in entries if e["function"] == 0 and e["index"] == 0), None)
    if leaf0 is None:
        return b""
    return struct.pack("<3I", leaf0["ebx"], leaf0["edx"], leaf0["ecx"])


def _max_leaf(entries: list[dict], base: int) -> int:
    e = next((e for e in entries if e["function"] == base and e["index"] == 0), None)
    return e["eax"] if e is not None else 0


# The caches every vCPU is told it has (leaf 4 on Intel, 0x8000001D on AMD), composed
# rather than the host's, as QEMU does by default: which CPUs share each one is the
# topology's, and the guest always has an L3 to make its LLC. (level, type, KiB, ways,
# per): type 1 data, 2 instruction, 3 unified; `per` "core" (its threads) or "llc".
CACHES = ((1, 1, 32, 8, "core"), (1, 2, 32, 8, "core"), (2, 3, 1024, 16, "core"),
          (3, 3, 16 * 1024, 16, "llc"))
CACHE_LINE = 64


def _cache_leaf(function: int, sub: int, topology: Topology) -> dict:
    """Subleaf `sub` of leaf 4 / 0x8000001D: CACHES[sub], or the terminator past them.
    EAX[25:14] is 'logical processors sharing this cache - 1': L1 and L2 are per core
    (2^thread_bits), the L3 per LLC (2^(thread_bits + core_bits)). Linux takes each
    cache's id as the APIC id shifted right by that many bits, and the LLC id (its
    sched domains' MC level, sched_ext's LLC masks) from the L3's."""
    regs = dict(eax=0, ebx=0, ecx=0, edx=0)
    if sub < len(CACHES):
        level, kind, kib, ways, per = CACHES[sub]
        bits = topology.thread_bits + (topology.core_bits if per == "llc" else 0)
        sets = kib * 1024 // (ways * CACHE_LINE)
        regs["eax"] = kind | (level << 5) | (1 << 8) | ((((1 << bits) - 1) & 0xFFF) << 14)
        if function == 4:  # EAX[31:26]: addressable core ids in the package - 1
            regs["eax"] |= (((1 << (topology.package_shift - topology.thread_bits)) - 1) & 0x3F) << 26
        regs["ebx"] = (ways - 1) << 22 | (CACHE_LINE - 1)  # one partition per line
        regs["ecx"] = sets - 1
        regs["edx"] = 0 if level < 3 else 0x2  # L3 inclusive of the lower levels
    return {"function": function, "index": sub, "flags": KVM_CPUID_FLAG_SIGNIFCANT_INDEX, **regs}


def _cache_leaves(function: int, topology: Topology) -> list[dict]:
    return [_cache_leaf(function, sub, topology) for sub in range(len(CACHES) + 1)]


def _x2apic_leaf(function: int, topology: Topology, apic_id: int) -> list[dict]:
    """Leaf 0xB/0x1F whole: the SMT level, the core level (everything below the
    package: the cores of all the package's LLCs), the terminator."""
    regs = [(topology.thread_bits, topology.threads, (X2APIC_LEVEL_SMT << 8) | 0),
            (topology.package_shift, topology.cpus_per_package, (X2APIC_LEVEL_CORE << 8) | 1),
            (0, 0, 2)]
    return [{"function": function, "index": sub, "flags": KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
             "eax": eax, "ebx": ebx, "ecx": ecx, "edx": apic_id}
            for sub, (eax, ebx, ecx) in enumerate(regs)]


def complete_amd_cache_leaves(entries: list[dict]) -> list[dict]:
    """Fill AMD's L1/L2 cache leaves where KVM lists them empty (KVM before it passed the
    host's 0x80000005 on, e.g. Linux 6.1 under the SVM lane's L1), as QEMU always
    describes its vCPUs' caches.

    Without TOPOEXT, Linux reads an AMD guest's caches from 0x80000005 (L1) and
    0x80000006 (L2, L3): it counts 3 or 4 cache leaves, and one empty or "see
    0x8000001D" leaf makes the whole cacheinfo fail ("-EIO"). The CPU is then left with
    cache leaves whose CPU masks are empty, no /sys/devices/system/cpu/cpu*/cache, and
    sched_ext's scx_cid_init() refuses every scheduler: its LLC mask does not contain the
    CPU (a WARN_ON_ONCE, silent without CONFIG_BUG) and scx_root_enable() fails with
    -EINVAL. A guest with TOPOEXT reads 0x8000001D instead, which KVM passes on; other
    vendors read leaf 4. Both are left as they are.
    """
    if cpuid_vendor(entries) not in AMD_VENDORS:
        return [dict(e) for e in entries]
    out = [dict(e) for e in entries]
    by_fn = {e["function"]: e for e in out if e["index"] == 0}
    ext1 = by_fn.get(0x80000001)
    if ext1 is not None and ext1["ecx"] & CPUID_80000001_ECX_TOPOEXT:
        return out
    max_ext = _max_leaf(out, 0x80000000)
    if max_ext >= 0x80000005:
        l1 = by_fn.get(0x80000005)
        if l1 is None:
            l1 = {"function": 0x80000005, "index": 0, "flags": 0, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0}
            out.append(l1)
        if not l1["ecx"] or not l1["edx"]:
            l1.update(eax=AMD_L1_TLB, ebx=AMD_L1_TLB, ecx=AMD_L1_CACHE, edx=AMD_L1_CACHE)
    if max_ext >= 0x80000006:
        l2 = by_fn.get(0x80000006)
        if l2 is None:
            l2 = {"function": 0x80000006, "index": 0, "flags": 0, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0}
            out.append(l2)
        assoc = (l2["ecx"] >> 12) & 0xF
        if assoc in (0, AMD_L2_L3_ASSOC_SEE_8000001D) or not l2["ecx"] & 0xFF:
            l2["ecx"] = AMD_L2_CACHE
        l3_assoc = (l2["edx"] >> 12) & 0xF
        if l3_assoc == AMD_L2_L3_ASSOC_SEE_8000001D or (l3_assoc and not l2["edx"] & 0xFF):
            l2["edx"] = 0  # no L3 rather than one Linux cannot read
    return out


def cpuid_entries_for_vcpu(entries: list[dict], index: int, topology: Topology) -> list[dict]:
    """Rewrite the host-supported CPUID list for vCPU `index` so that the guest sees
    `topology` (vmm.machine.topology; as QEMU composes these leaves, KVM describes no
    topology itself):

    - leaf 1: the APIC id, the logical processors per package, HTT;
    - x2APIC topology, leaf 0xB (and 0x1F where listed): composed whole, SMT level,
      core level (shift: the package's bits) and terminator. KVM lists these leaves
      zeroed and without subleaf 1 ("no topology"): rewriting only what is listed left
      Linux with an SMT level alone, and then every vCPU was a package of its own;
    - cache leaves 4 (Intel) and 0x8000001D (AMD): composed (CACHES), L1/L2 per core,
      the L3 per LLC;
    - AMD: TOPOEXT set (its leaves are CPUID data only, composed here, so a host without
      it, like the SVM lane's, describes the same LLCs); 0x8000001E with the extended
      APIC id, the core id in the package, threads per core and, as "node id", the
      global LLC index with one such node per package (Linux before family 0x17 takes
      its LLC id from that field, later families from 0x8000001D; more than one per
      package would shrink its PKG level to them); 0x80000008 ECX: threads per
      package and the APIC id bits they take. 0x80000026 (AMD's newer topology leaf,
      which Linux would prefer to 0xB) is left out;
    - AMD L1/L2 cache leaves KVM leaves empty: complete_amd_cache_leaves.
    """
    apic_id = topology.apic_id(index)
    amd = cpuid_vendor(entries) in AMD_VENDORS
    max_basic = _max_leaf(entries, 0)
    out = []
    composed = set()
    for e in complete_amd_cache_leaves(entries):
        fn, sub = e["function"], e["index"]
        if fn == 1:
            logical = 1 << topology.package_shift
            e["ebx"] = (e["ebx"] & 0x0000FFFF) | (min(logical, 0xFF) << 16) | (apic_id << 24)
            if topology.cpus > 1:
                e["edx"] |= 1 << 28  # HTT: the package has several logical processors
        elif fn in (0xB, 0x1F, 4, 0x8000001D):
            if fn not in composed and (fn != 0x8000001D or amd):
                composed.add(fn)
                out += (_x2apic_leaf(fn, topology, apic_id) if fn in (0xB, 0x1F)
                        else _cache_leaves(fn, topology))
            continue
        elif fn == 0x80000026 and amd:
            continue
        elif fn == 0x80000000 and amd:
            e["eax"] = max(e["eax"], 0x8000001E)
        elif fn == 0x80000001 and amd:
            e["ecx"] |= CPUID_80000001_ECX_TOPOEXT
        elif fn == 0x8000001E and amd:
            continue  # composed below, once
        elif fn == 0x80000008 and amd:
            e["ecx"] = ((e["ecx"] & ~0xF0FF) | ((topology.package_shift & 0xF) << 12)
                        | ((topology.cpus_per_package - 1) & 0xFF))
        out.append(e)
    if max_basic >= 0xB and 0xB not in composed:
        out += _x2apic_leaf(0xB, topology, apic_id)
    if max_basic >= 4 and 4 not in composed:
        out += _cache_leaves(4, topology)
    if amd:
        if 0x8000001D not in composed:
            out += _cache_leaves(0x8000001D, topology)
        core_in_package = (index // topology.threads) % (topology.cpus_per_package // topology.threads)
        out.append({"function": 0x8000001E, "index": 0, "flags": 0, "eax": apic_id,
                    "ebx": ((topology.threads - 1) << 8) | (core_in_package & 0xFF),
                    "ecx": topology.llc_of(index) & 0xFF, "edx": 0})
    return out


_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def cpuid_to_list(cpuid) -> list[dict]:
    return [{f: getattr(cpuid.entries[i], f) for f in _CPUID_FIELDS} for i in range(cpuid.nent)]


def cpuid_from_list(entries: list[dict]):
    from vmm.kvm.native import native

    ffi, _ = native()
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, e in enumerate(entries):
        for f in _CPUID_FIELDS:
            setattr(cpuid.entries[i], f, e[f])
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
