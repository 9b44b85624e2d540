import struct
from types import SimpleNamespace

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
