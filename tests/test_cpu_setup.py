import struct
from types import SimpleNamespace

import pytest

from vmm.machine import cpu
from vmm.machine import layout as L
from vmm.machine.tables import Topology


def decode(desc):
    base = ((desc >> 16) & 0xFFFFFF) | ((desc >> 56) << 24)
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    return base, limit, access, flags


def test_gdt_layout():
    raw = cpu.gdt_bytes()
    entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
    assert entries[0] == entries[1] == 0
    base, limit, access, flags = decode(entries[cpu.BOOT_CS // 8])
    assert (base, limit, access) == (0, 0xFFFFF, 0x9B) and flags == 0xA  # G, L
    base, limit, access, flags = decode(entries[cpu.BOOT_DS // 8])
    assert (base, limit, access) == (0, 0xFFFFF, 0x93) and flags == 0xC  # G, D/B
    assert len(entries) == 4
    assert L.GDT_START + len(raw) <= L.IDT_START


def seg():
    return SimpleNamespace()


def test_long_mode_sregs_and_regs():
    s = SimpleNamespace(cs=seg(), ds=seg(), es=seg(), fs=seg(), gs=seg(), ss=seg(), tr=seg(),
                        gdt=seg(), idt=seg())
    cpu.configure_sregs(s)
    assert s.cr0 & (cpu.CR0_PE | cpu.CR0_PG) == cpu.CR0_PE | cpu.CR0_PG
    assert s.cr4 & cpu.CR4_PAE and s.efer == cpu.EFER_LME | cpu.EFER_LMA and s.cr3 == L.PML4_START
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type) == (0x10, 1, 0, 0xB)
    assert all(x.selector == 0x18 and x.db == 1 and x.l == 0 for x in (s.ds, s.es, s.ss))
    assert (s.tr.type, s.tr.s, s.tr.present) == (0xB, 0, 1)
    assert s.gdt.base == L.GDT_START and s.idt.base == L.IDT_START
    r = SimpleNamespace()
    cpu.configure_regs(r, entry=0x1000000)
    assert (r.rip, r.rsi, r.rsp, r.rflags) == (0x1000000, L.ZERO_PAGE_START, L.BOOT_STACK_TOP, 2)


def entry(fn, index=0, **regs):
    e = {"function": fn, "index": index, "flags": 0, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0}
    e.update(regs)
    return e


def test_cpuid_apic_ids_and_topology_leaves():
    supported = [entry(0, eax=0x1F), entry(1, ebx=0x00010800, edx=0), entry(0xB, 0), entry(0xB, 1),
                 entry(0xB, 2), entry(0x40000000, ebx=0x4B4D564B)]
    topo = Topology.sockets(2, 2, 2)
    out = cpu.cpuid_entries_for_vcpu(supported, 5, topo)
    by_key = {(e["function"], e["index"]): e for e in out}
    apic = topo.apic_id(5)
    assert apic == 5 and by_key[(1, 0)]["ebx"] >> 24 == apic
    assert (by_key[(1, 0)]["ebx"] >> 16) & 0xFF == 4 and by_key[(1, 0)]["edx"] & (1 << 28)
    assert by_key[(1, 0)]["ebx"] & 0xFFFF == 0x0800  # CLFLUSH size etc. kept
    assert (by_key[(0xB, 0)]["eax"], by_key[(0xB, 0)]["ebx"], by_key[(0xB, 0)]["ecx"]) == (1, 2, 0x100)
    assert (by_key[(0xB, 1)]["eax"], by_key[(0xB, 1)]["ebx"], by_key[(0xB, 1)]["ecx"]) == (2, 4, 0x201)
    assert by_key[(0xB, 2)]["ecx"] == 2 and all(by_key[(0xB, i)]["edx"] == apic for i in range(3))
    assert by_key[(0x40000000, 0)]["ebx"] == 0x4B4D564B  # paravirt signature passed through
    assert supported[1]["ebx"] == 0x00010800  # the input list is not modified


AMD = dict(ebx=0x68747541, edx=0x69746E65, ecx=0x444D4163)  # "AuthenticAMD"
INTEL = dict(ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E)  # "GenuineIntel"


def kvm_amd_list(topoext=False, l1=0, l2=0x02008140, l3=0x00808140):
    """KVM_GET_SUPPORTED_CPUID as the SVM lane's L1 (Linux 6.1, QEMU's AMD CPU) lists
    it: leaf 0xB zeroed with no subleaf 1, 0x80000005 empty, L2 and L3 in 0x80000006."""
    return [entry(0, eax=0xD, **AMD), entry(1, ebx=0x00000800),
            entry(0xB, 0, flags=1, edx=0), entry(0x80000000, eax=0x8000001E, **AMD),
            entry(0x80000001, ecx=0x177 | (cpu.CPUID_80000001_ECX_TOPOEXT if topoext else 0)),
            entry(0x80000005, ecx=l1, edx=l1), entry(0x80000006, ecx=l2, edx=l3),
            entry(0x80000008, eax=0x3028, ecx=0x00001001),
            entry(0x8000001D, 0, flags=1, eax=0x121), entry(0x8000001D, 1, flags=1, eax=0x122),
            entry(0x8000001D, 2, flags=1, eax=0x143), entry(0x8000001D, 3, flags=1, eax=0x4163),
            entry(0x8000001D, 4, flags=1), entry(0x8000001E)]


@pytest.mark.parametrize("shape, index, pkg_bits", [((1, 2, 1), 1, 1), ((1, 4, 2), 5, 3), ((2, 2, 1), 3, 1)])
def test_cpuid_x2apic_leaf_composed_whole_where_kvm_lists_it_empty(shape, index, pkg_bits):
    """KVM lists leaf 0xB zeroed and without subleaf 1: the VMM describes the topology
    (with only an SMT level, Linux made every vCPU a package of its own)."""
    topo = Topology.sockets(*shape)
    out = cpu.cpuid_entries_for_vcpu(kvm_amd_list(), index, topo)
    xb = sorted((e for e in out if e["function"] == 0xB), key=lambda e: e["index"])
    assert [e["index"] for e in xb] == [0, 1, 2]
    assert all(e["flags"] == cpu.KVM_CPUID_FLAG_SIGNIFCANT_INDEX and e["edx"] == topo.apic_id(index) for e in xb)
    assert (xb[0]["eax"], xb[0]["ebx"], xb[0]["ecx"]) == (topo.thread_bits, topo.threads, 0x100)
    assert (xb[1]["eax"], xb[1]["ebx"], xb[1]["ecx"]) == (pkg_bits, topo.threads * topo.cores, 0x201)
    assert (xb[2]["eax"], xb[2]["ebx"], xb[2]["ecx"] & 0xFF00) == (0, 0, 0)  # the terminator
    leaf = leaves(out)
    assert leaf[(0x80000008, 0)]["ecx"] == (pkg_bits << 12) | (topo.threads * topo.cores - 1)


def test_cpuid_x2apic_leaf_added_when_kvm_omits_it():
    out = leaves(cpu.cpuid_entries_for_vcpu([entry(0, eax=0xD, **INTEL), entry(1)], 1, Topology.sockets(1, 2, 1)))
    assert (out[(0xB, 1)]["eax"], out[(0xB, 1)]["ebx"], out[(0xB, 1)]["edx"]) == (1, 2, 1)
    no_leaf_b = leaves(cpu.cpuid_entries_for_vcpu([entry(0, eax=0xA, **INTEL), entry(1)], 1, Topology.sockets(1, 2, 1)))
    assert (0xB, 0) not in no_leaf_b  # beyond the guest's maximum basic leaf


def test_cpuid_amd_empty_l1_cache_leaf_is_filled_without_topoext():
    """Linux 6.1's KVM lists 0x80000005 empty; an AMD guest without TOPOEXT then failed
    its whole cacheinfo and sched_ext refused every scheduler (scx_root_enable -22)."""
    supported = kvm_amd_list()
    out = leaves(cpu.cpuid_entries_for_vcpu(supported, 0, Topology.sockets(1, 2, 1)))
    l1 = out[(0x80000005, 0)]
    assert (l1["ecx"], l1["edx"]) == (cpu.AMD_L1_CACHE, cpu.AMD_L1_CACHE)
    assert (l1["ecx"] >> 24, (l1["ecx"] >> 16) & 0xFF, l1["ecx"] & 0xFF) == (32, 8, 64)  # KiB, ways, line
    assert (out[(0x80000006, 0)]["ecx"], out[(0x80000006, 0)]["edx"]) == (0x02008140, 0x00808140)  # kept
    assert supported[5]["ecx"] == 0  # the input is not modified


@pytest.mark.parametrize("l2, l3, want_l2, want_l3", [
    (0, 0x00808140, cpu.AMD_L2_CACHE, 0x00808140),  # empty L2: described
    (0x02009140, 0x00809140, cpu.AMD_L2_CACHE, 0),  # "see 0x8000001D" without TOPOEXT
    (0x02008140, 0, 0x02008140, 0)])  # no L3: fine as it is
def test_cpuid_amd_l2_l3_leaf_made_readable(l2, l3, want_l2, want_l3):
    out = leaves(cpu.complete_amd_cache_leaves(kvm_amd_list(l2=l2, l3=l3)))
    assert (out[(0x80000006, 0)]["ecx"], out[(0x80000006, 0)]["edx"]) == (want_l2, want_l3)


def test_cpuid_cache_leaves_left_alone_with_topoext_or_on_intel_or_when_present():
    with_topoext = kvm_amd_list(topoext=True)
    assert cpu.complete_amd_cache_leaves(with_topoext) == with_topoext
    intel = [dict(e, **INTEL) if e["function"] in (0, 0x80000000) else e for e in kvm_amd_list()]
    assert cpu.complete_amd_cache_leaves(intel) == intel
    real = kvm_amd_list(l1=0x20080140)
    assert cpu.complete_amd_cache_leaves(real) == real


def test_cpuid_cache_sharing_and_amd_extended_topology():
    """Which CPUs share a cache follows the topology: L1/L2 per core, L3 per package
    (Linux derives the LLC masks from it); 0x8000001E names the core and its threads."""
    topo = Topology.sockets(1, 4, 2)
    out = leaves(cpu.cpuid_entries_for_vcpu(kvm_amd_list(topoext=True), 5, topo))
    sharing = [((out[(0x8000001D, i)]["eax"] >> 14) & 0xFFF) + 1 for i in range(4)]
    assert sharing == [2, 2, 2, 8]
    assert out[(0x8000001D, 4)]["eax"] == 0  # the terminator stays empty
    e = out[(0x8000001E, 0)]
    assert (e["eax"], e["ebx"] & 0xFF, (e["ebx"] >> 8) & 0xFF, e["ecx"]) == (5, 2, 1, 0)
    intel = [entry(0, eax=0xD, **INTEL), entry(4, 0, flags=1, eax=0x121), entry(4, 3, flags=1, eax=0x163)]
    out = leaves(cpu.cpuid_entries_for_vcpu(intel, 0, Topology.sockets(2, 2, 1)))
    assert [((out[(4, i)]["eax"] >> 14) & 0xFFF) + 1 for i in (0, 3)] == [1, 2]
    assert out[(4, 3)]["eax"] >> 26 == 1  # cores per package - 1


def test_boot_msrs_include_fast_strings():
    assert cpu.BOOT_MSRS[cpu.MSR_IA32_MISC_ENABLE] & 1
    assert cpu.BOOT_MSRS[cpu.MSR_MTRR_DEF_TYPE] == 0x806


# --- paravirtual CPUID (what QEMU gives a KVM guest) --------------------------------------------
def kvm_supported(hypervisor_bit=False, invtsc=True, features=0x01007EFB | cpu.KVM_FEATURE_MSI_EXT_DEST_ID):
    """A KVM_GET_SUPPORTED_CPUID list as an older host kernel reports it: no hypervisor
    bit in leaf 1, the KVM leaves with KVM's own feature list."""
    return [entry(0, eax=0x10), entry(1, eax=0xA10F11, ecx=0x00202000 | (cpu.CPUID_1_ECX_HYPERVISOR if hypervisor_bit else 0)),
            entry(0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
            entry(0x40000001, eax=features), entry(0x80000000, eax=0x80000008),
            entry(0x80000007, edx=cpu.CPUID_APM_EDX_INVTSC if invtsc else 0)]


def leaves(out):
    return {(e["function"], e["index"]): e for e in out}


def signature(e):
    return struct.pack("<3I", e["ebx"], e["ecx"], e["edx"])


def test_paravirt_cpuid_tells_the_guest_it_runs_on_kvm_with_kvm_clock():
    supported = kvm_supported()
    out = leaves(cpu.paravirt_cpuid(supported, tsc_khz=2596134, tsc_deadline=True))
    leaf1 = out[(1, 0)]["ecx"]
    assert leaf1 & cpu.CPUID_1_ECX_HYPERVISOR and leaf1 & cpu.CPUID_1_ECX_TSC_DEADLINE
    assert leaf1 & 0x00202000 == 0x00202000  # KVM's own bits kept
    assert signature(out[(0x40000000, 0)]) == b"KVMKVMKVM\0\0\0"
    features = out[(0x40000001, 0)]["eax"]
    assert features & cpu.KVM_FEATURE_CLOCKSOURCE2 and features & cpu.KVM_FEATURE_CLOCKSOURCE_STABLE_BIT
    assert not features & cpu.KVM_FEATURES_NEEDING_VMM  # MSI ext dest id etc. need the VMM
    assert features == 0x01007EFB  # everything else as KVM listed it
    assert supported[1]["ecx"] == 0x00202000  # the input is not modified


def test_paravirt_cpuid_timing_leaf_with_known_frequency_and_invariant_tsc():
    out = leaves(cpu.paravirt_cpuid(kvm_supported(), tsc_khz=2596134))
    assert out[(0x40000000, 0)]["eax"] == cpu.KVM_CPUID_TIMING  # max hypervisor leaf
    timing = out[(cpu.KVM_CPUID_TIMING, 0)]
    assert (timing["eax"], timing["ebx"]) == (2596134, 1_000_000)
    assert out[(0x80000007, 0)]["edx"] & cpu.CPUID_APM_EDX_INVTSC
    assert "TSC 2596134 kHz" in cpu.describe_paravirt(list(out.values()))
    assert "kvm-clock" in cpu.describe_paravirt(list(out.values()))


@pytest.mark.parametrize("tsc_khz, invtsc", [(None, True), (0, True), (2596134, False)])
def test_paravirt_cpuid_no_timing_leaf_without_frequency_or_invariant_tsc(tsc_khz, invtsc):
    out = leaves(cpu.paravirt_cpuid(kvm_supported(invtsc=invtsc), tsc_khz=tsc_khz))
    assert (cpu.KVM_CPUID_TIMING, 0) not in out
    assert out[(0x40000000, 0)]["eax"] == cpu.KVM_CPUID_FEATURES
    assert not out[(1, 0)]["ecx"] & cpu.CPUID_1_ECX_TSC_DEADLINE  # not asked for


def test_paravirt_cpuid_is_idempotent_and_adds_missing_kvm_leaves():
    once = cpu.paravirt_cpuid(kvm_supported(hypervisor_bit=True), tsc_khz=1000000, tsc_deadline=True)
    assert cpu.paravirt_cpuid(once, tsc_khz=1000000, tsc_deadline=True) == once
    bare = [entry(0, eax=1), entry(1)]
    out = leaves(cpu.paravirt_cpuid(bare, tsc_khz=1000000))
    assert signature(out[(0x40000000, 0)]) == b"KVMKVMKVM\0\0\0"
    assert out[(0x40000001, 0)]["eax"] == 0  # KVM listed no features: none offered
    assert (cpu.KVM_CPUID_TIMING, 0) not in out  # no invariant TSC known


def test_paravirt_cpuid_survives_the_per_vcpu_rewrite():
    shared = cpu.paravirt_cpuid(kvm_supported(), tsc_khz=2596134, tsc_deadline=True)
    out = leaves(cpu.cpuid_entries_for_vcpu(shared, 1, Topology.sockets(1, 2, 1)))
    assert out[(1, 0)]["ecx"] & cpu.CPUID_1_ECX_HYPERVISOR and out[(1, 0)]["ebx"] >> 24 == 1
    assert out[(cpu.KVM_CPUID_TIMING, 0)]["eax"] == 2596134


@pytest.mark.kvm
def test_machine_gives_every_vcpu_the_paravirt_leaves():
    """On this host's KVM (not mocked): KVM_SET_CPUID2 takes the leaves on every vCPU and
    the frequency in the timing leaf is KVM_GET_TSC_KHZ's."""
    from guest_abi import GUEST_DIR, require_guests
    from vmm.runtime import Machine

    guest = GUEST_DIR / "out" / "guest.elf"
    require_guests(guest)
    m = Machine(kernel=str(guest), cpus=2).build()
    try:
        khz = m.vcpus[0].get_tsc_khz()
        assert khz is None or khz > 100_000
        line = next(n for n in m.notes if n.startswith("paravirt CPUID"))
        assert "kvm-clock" in line
        if khz:
            assert f"TSC {khz} kHz" in line or "no timing leaf" in line
    finally:
        m.stop()
