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
    topo = Topology(2, 2, 2)
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
    out = leaves(cpu.cpuid_entries_for_vcpu(shared, 1, Topology(1, 2, 1)))
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
