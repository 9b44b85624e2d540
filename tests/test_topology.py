"""Topology specs, presets and everything derived from them, read back from the bytes.

The tables and CPUID are decoded here as a guest reads them (ACPI structure layouts,
Linux's rules for cache and package ids), not compared with the generator's own view."""

import struct
from pathlib import Path

import pytest

from vmm import topology
from vmm.errors import ConfigError
from vmm.machine import cpu
from vmm.machine import layout as L
from vmm.machine import tables
from vmm.machine.config import MachineConfig
from vmm.machine.topology import Topology

MiB, GiB = 1 << 20, 1 << 30


# --- specs, limits, presets -----------------------------------------------------------------
def test_spec_fields_and_cpu_numbering():
    t = topology.parse("2n4l2c2t")
    assert (t.nodes, t.llcs, t.cores, t.threads, t.cpus) == (2, 4, 2, 2, 16)
    assert t.node_cpus(1) == list(range(8, 16)) and t.llc_cpus(3) == [12, 13, 14, 15]
    assert t.thread_siblings(5) == [4, 5] and t.node_of(7) == 0 and t.llc_of(7) == 1
    # thread | core | LLC in node | node, 1 bit each
    assert t.apic_ids() == list(range(16))
    odd = topology.parse("2n6l3c1t")  # 3 LLCs per node (2 bits), 3 cores (2 bits)
    assert odd.apic_id(3) == 0b0100 and odd.apic_id(9) == 0b10000 and odd.spec == "2n6l3c1t"


def test_old_spec_keeps_its_apic_ids_and_packages():
    t = topology.parse("2s3c2t", 12)
    assert t.legacy and t.apic_ids() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert t.package_shift == 3 and t.spec == "2s3c2t"
    assert Topology.parse(None, 4).apic_ids() == [0, 1, 2, 3]
    assert Topology.parse((1, 2, 2), 4) == Topology.sockets(1, 2, 2)


@pytest.mark.parametrize("spec, cpus, words", [
    ("2n3l2c1t", None, "do not divide"), ("9n9l1c1t", None, "at most 8"),
    ("1n1l255c1t", None, "at most 254"), ("1n3l65c1t", None, "APIC id"),
    ("2n4l2c2t", 8, "cpus=8"), ("2x4", None, "not understood"), ("0n0l1c1t", None, "positive"),
    ("1n128l1c1t", None, "at most 64"), (3.5, None, "not 3.5")])
def test_bad_specs_name_the_part_that_is_wrong(spec, cpus, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        topology.parse(spec, cpus)


def test_presets_cover_the_range():
    p = topology.presets()
    assert len(p) >= 12
    topos = [topology.parse(name) for name in p]
    assert [t.cpus for t in topos] == sorted(t.cpus for t in topos)
    assert min(t.cpus for t in topos) == 1 and max(t.cpus for t in topos) == 64
    assert {t.nodes for t in topos} >= {1, 2, 4} and {t.llcs for t in topos} >= {1, 16}
    assert {t.threads for t in topos} == {1, 2}
    assert topology.parse("numa2-llc4-smt") == topology.parse("2n4l2c2t")


def test_machine_config_implies_cpus_and_refuses_a_conflict():
    c = MachineConfig.create("k", topology="2n4l2c2t")
    assert c.cpus == 16 and c.topology.node_memory == (256 * MiB, 256 * MiB)
    with pytest.raises(ConfigError, match="cpus=4"):
        MachineConfig.create("k", cpus=4, topology="2n4l2c2t")
    assert MachineConfig.create("k", cpus=3).topology.apic_ids() == [0, 1, 2]


def test_per_node_memory_and_memory_only_nodes():
    c = MachineConfig.create("k", topology="2n2l1c1t", memory={0: "1G", 1: "512M", 2: "256M"})
    assert c.memory_size == 1792 * MiB and c.topology.all_nodes == 3
    assert c.topology.node_cpus(2) == []
    for bad, words in [({0: "1G"}, "give each of them"), ({0: "1G", 2: "1G"}, "none left out"),
                       ({0: "1G", 1: "3M"}, "multiple of 2 MiB"), ({0: "1G", 1: True}, "bytes or a size")]:
        with pytest.raises(ConfigError, match=words):
            MachineConfig.create("k", topology="2n2l1c1t", memory=bad)
    # distances for the memory-only node may come before its memory
    far = topology.parse("numa2", distances=[[10, 20, 30], [20, 10, 30], [30, 30, 10]])
    c = MachineConfig.create("k", topology=far, memory={0: "256M", 1: "256M", 2: "128M"})
    assert c.topology.distance_matrix()[2] == [30, 30, 10]
    with pytest.raises(ConfigError, match="4x4 matrix"):
        MachineConfig.create("k", topology=far, memory={0: "256M", 1: "256M", 2: "64M", 3: "64M"})
    with pytest.raises(ConfigError, match="each node needs"):
        MachineConfig.create("k", topology="4n4l1c1t", memory="64M")
    with pytest.raises(ConfigError, match="more than this host has"):
        MachineConfig.create("k", memory=1 << 45)


def test_distances_are_checked():
    t = topology.parse("2n2l1c1t", distances=30)
    assert t.distance_matrix() == [[10, 30], [30, 10]]
    for bad in ([[10, 20]], [[10, 20], [20, 11]], [[10, 5], [5, 10]], "far"):
        with pytest.raises(ConfigError, match="distance"):
            topology.parse("2n2l1c1t", distances=bad)


# --- memory: ranges, e820, slots agree ------------------------------------------------------
def test_node_ranges_cross_the_mmio_gap_and_cut_e820_and_slots():
    t = topology.parse("2n2l1c1t").with_memory(5 * GiB, {0: "2G", 1: "3G"})
    ranges = t.memory_ranges(5 * GiB)
    assert ranges == [(0, 0, 2 * GiB), (1, 2 * GiB, GiB), (1, 4 * GiB, 2 * GiB)]
    assert t.memory_boundaries(5 * GiB) == [2 * GiB]
    e820 = [(a, s) for a, s, k in L.e820_map(5 * GiB, t.memory_boundaries(5 * GiB)) if k == L.E820_RAM]
    # every RAM entry lies inside exactly one node's range
    for a, s in e820:
        assert sum(1 for _, g, n in ranges if g <= a and a + s <= g + n) == 1
    assert sum(s for _, s in e820) + (L.HIMEM_START - L.EBDA_START) == 5 * GiB


@pytest.mark.kvm
def test_memory_slots_are_the_nodes_ranges():
    from vmm.kvm import GuestMemory

    t = topology.parse("2n2l1c1t").with_memory(5 * GiB, {0: "2G", 1: "3G"})
    with GuestMemory(5 * GiB, split_at=t.memory_boundaries(5 * GiB)) as mem:  # MAP_NORESERVE
        assert [(g, s) for g, s, _ in mem.regions] == [(g, s) for _, g, s in t.memory_ranges(5 * GiB)]


# --- ACPI tables read back ------------------------------------------------------------------
def acpi_by_signature(blob: bytes, base: int = L.ACPI_START) -> dict[bytes, bytes]:
    """Follow RSDP -> XSDT -> tables in the blob as the guest does, checking checksums."""
    assert blob[:8] == b"RSD PTR " and sum(blob[:20]) % 256 == 0 and sum(blob[:36]) % 256 == 0
    xsdt_at = struct.unpack_from("<Q", blob, 24)[0] - base

    def table(off):
        length = struct.unpack_from("<I", blob, off + 4)[0]
        data = blob[off:off + length]
        assert sum(data) % 256 == 0, data[:4]
        return data

    xsdt = table(xsdt_at)
    out = {}
    for i in range((len(xsdt) - 36) // 8):
        t = table(struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0] - base)
        out[t[:4]] = t
    return out


def parse_srat(t: bytes):
    cpus, mems, off = [], [], 48
    while off < len(t):
        kind, length = t[off], t[off + 1]
        if kind == 0:
            dom = t[off + 2] | int.from_bytes(t[off + 9:off + 12], "little") << 8
            apic, flags = t[off + 3], struct.unpack_from("<I", t, off + 4)[0]
            cpus.append((apic, dom, flags & 1))
        elif kind == 1:
            dom, = struct.unpack_from("<I", t, off + 2)
            base, size = struct.unpack_from("<QQ", t, off + 8)
            mems.append((dom, base, size, struct.unpack_from("<I", t, off + 28)[0] & 1))
        off += length
    return cpus, mems


def parse_madt_apics(t: bytes) -> list[int]:
    out, off = [], 44
    while off < len(t):
        kind, length = t[off], t[off + 1]
        if kind == 0:
            out.append(t[off + 3])
        off += length
    return out


@pytest.mark.parametrize("spec", ["2n4l2c2t", "4n16l2c2t", "numa4-llc8", "1n2l2c1t"])
def test_srat_slit_madt_agree_with_the_spec(spec):
    size = 1 * GiB
    t = topology.parse(spec).with_memory(size)
    blob, _ = tables.acpi_tables(t.apic_ids(), topology=t, memory_size=size)
    found = acpi_by_signature(blob)
    apics = parse_madt_apics(found[b"APIC"])
    assert len(apics) == t.cpus and len(set(apics)) == t.cpus
    if t.nodes == 1:
        assert b"SRAT" not in found and b"SLIT" not in found
        return
    cpus, mems = parse_srat(found[b"SRAT"])
    # the guest's CPU n is the n-th MADT entry; its node is the SRAT's entry for its APIC id
    node_of_apic = {apic: dom for apic, dom, enabled in cpus if enabled}
    for n, apic in enumerate(apics):
        assert node_of_apic[apic] == n * t.nodes // t.cpus  # consecutive CPUs per node
    share = size // t.nodes
    assert [(b, s) for _, b, s, _ in mems] == [(share * i, share) for i in range(t.nodes)]
    assert [d for d, *_ in mems] == list(range(t.nodes))
    slit = found[b"SLIT"]
    n = struct.unpack_from("<Q", slit, 36)[0]
    matrix = [list(slit[44 + r * n:44 + (r + 1) * n]) for r in range(n)]
    assert n == t.nodes and all(matrix[a][b] == (10 if a == b else 20) for a in range(n) for b in range(n))


def test_memory_only_node_in_srat_and_slit():
    t = topology.parse("2n2l1c1t").with_memory(1 * GiB, {0: "256M", 1: "256M", 2: "512M"})
    t = Topology.parse(t, distances=[[10, 20, 30], [20, 10, 30], [30, 30, 10]])
    blob, _ = tables.acpi_tables(t.apic_ids(), topology=t, memory_size=1 * GiB)
    found = acpi_by_signature(blob)
    cpus, mems = parse_srat(found[b"SRAT"])
    assert {d for _, d, _ in cpus} == {0, 1} and [(d, b, s) for d, b, s, _ in mems] == [
        (0, 0, 256 * MiB), (1, 256 * MiB, 256 * MiB), (2, 512 * MiB, 512 * MiB)]
    assert found[b"SLIT"][44:53] == bytes([10, 20, 30, 20, 10, 30, 30, 30, 10])
    assert t.expected_sched_domains(0) == [("NUMA", [0, 1])]  # the 30 level adds no CPU


def test_mp_table_lists_the_apic_ids():
    t = topology.parse("1n2l2c2t")
    mp = tables.mp_table(t.apic_ids())
    cfg = mp[16:]
    count = struct.unpack_from("<H", cfg, 34)[0]
    procs, off = [], 44
    for _ in range(count):
        if cfg[off] == 0:
            procs.append(cfg[off + 1])
            off += 20
        else:
            off += 8
    assert procs == t.apic_ids()


# --- CPUID, decoded with Linux's rules ------------------------------------------------------
def entry(fn, index=0, **regs):
    e = {"function": fn, "index": index, "flags": 0, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0}
    e.update(regs)
    return e


AMD = dict(ebx=0x68747541, edx=0x69746E65, ecx=0x444D4163)
INTEL = dict(ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E)
HOSTS = {
    "intel": [entry(0, eax=0x1F, **INTEL), entry(1), entry(4, 0, flags=1, eax=0x121), entry(0xB, 0),
              entry(0x1F, 0), entry(0x80000000, eax=0x80000008)],
    # the SVM lane's L1: AMD without TOPOEXT, leaf 0xB zeroed, 0x80000026 not there
    "amd-no-topoext": [entry(0, eax=0xD, **AMD), entry(1), entry(0xB, 0, flags=1),
                       entry(0x80000000, eax=0x80000008, **AMD), entry(0x80000001, ecx=0x177),
                       entry(0x80000008, ecx=0x1001)],
    "amd-zen": [entry(0, eax=0x10, **AMD), entry(1), entry(0xB, 0, flags=1), entry(0xB, 1, flags=1),
                entry(0x80000000, eax=0x80000026, **AMD), entry(0x80000001, ecx=1 << 22),
                entry(0x8000001D, 0, flags=1, eax=0x121), entry(0x8000001E), entry(0x80000026, 0, ebx=5)],
}


def linux_view(out: list[dict]):
    """(APIC id, package id, LLC id, core-sharing id) as Linux computes them from CPUID."""
    leaf = {(e["function"], e["index"]): e for e in out}
    amd = (0x80000001, 0) in leaf
    apic = leaf[(0xB, 0)]["edx"]
    pkg = apic >> leaf[(0xB, 1)]["eax"]
    caches = [leaf[(0x8000001D if amd else 4, i)] for i in range(8) if (0x8000001D if amd else 4, i) in leaf]
    assert caches[-1]["eax"] & 0x1F == 0  # terminated
    l3 = next(c for c in caches if (c["eax"] >> 5) & 7 == 3)
    l1 = caches[0]
    share = lambda c: (((c["eax"] >> 14) & 0xFFF) + 1 - 1).bit_length()  # get_count_order
    if amd:
        assert leaf[(0x80000001, 0)]["ecx"] & cpu.CPUID_80000001_ECX_TOPOEXT
        assert leaf[(0x80000000, 0)]["eax"] >= 0x8000001E and (0x80000026, 0) not in leaf
        e = leaf[(0x8000001E, 0)]
        assert e["eax"] == apic and (e["ecx"] >> 8) & 7 == 0  # one "node" per package
        assert e["ecx"] & 0xFF == apic >> share(l3)  # pre-Zen Linux: LLC id = node id
    return apic, pkg, apic >> share(l3), apic >> share(l1)


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("spec", ["2n4l2c2t", "1n2l2c1t", "4n16l2c2t", "2s3c2t", "1n1l3c1t"])
def test_cpuid_gives_linux_the_spec_s_llcs_packages_and_cores(host, spec):
    t = topology.parse(spec)
    views = [linux_view(cpu.cpuid_entries_for_vcpu(HOSTS[host], i, t)) for i in range(t.cpus)]
    assert [v[0] for v in views] == t.apic_ids()
    for a in range(t.cpus):
        for b in range(t.cpus):
            assert (views[a][2] == views[b][2]) == (t.llc_of(a) == t.llc_of(b)), (a, b)
            assert (views[a][3] == views[b][3]) == (b in t.thread_siblings(a)), (a, b)
            same_pkg = t.llc_of(a) == t.llc_of(b) if t.legacy else t.node_of(a) == t.node_of(b)
            assert (views[a][1] == views[b][1]) == same_pkg, (a, b)


# --- the sched domains Linux should build ---------------------------------------------------
def test_expected_sched_domains():
    t = topology.parse("2n4l2c2t")
    assert t.expected_sched_domains(5) == [("SMT", [4, 5]), ("MC", [4, 5, 6, 7]),
                                           ("PKG", list(range(8))), ("NUMA", list(range(16)))]
    assert topology.parse("1n1l4c1t").expected_sched_domains(0) == [("MC", [0, 1, 2, 3])]
    assert topology.parse("uni").expected_sched_domains(0) == []
    assert [n for n, _ in topology.parse("2s2c1t").expected_sched_domains(0)] == ["MC", "PKG"]


# --- vmm run --topology ---------------------------------------------------------------------
@pytest.mark.kvm
def test_cli_topology_boots_and_refuses_bad_specs_before_starting():
    import subprocess
    import sys
    from pathlib import Path

    guest = Path(__file__).resolve().parents[1] / "kernels/guests/out/guest.elf"
    if not guest.exists():
        pytest.skip("test guest not built: make guests")
    run = lambda spec: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "vmm.cli", "run", "--kernel", str(guest), "--topology", spec,
         "--cmdline", "mode=hello exit=3"], capture_output=True, text=True, timeout=120)
    assert run("numa2-smt").returncode == 3
    bad = run("2n3l2c1t")
    assert bad.returncode == 1 and "3 LLCs do not divide among 2 nodes" in bad.stderr
    assert "vmm-guest" not in bad.stdout  # refused before the VM started


@pytest.mark.kvm
@pytest.mark.parametrize("spec", ["1n3l3c1t", "2n2l3c2t", "2n4l2c2t"])
def test_each_vcpus_lapic_id_is_the_topologys_apic_id(spec):
    """KVM gives a vCPU its vcpu_id as (x)APIC ID: the builder creates each with the id
    the MADT, MP table and CPUID name, gaps included (3 cores per LLC: 0, 1, 2, 4, ...);
    with the CPU index instead, the guest would send INIT/SIPI to ids no vCPU has."""
    from vmm.kvm import vcpu_state
    from vmm.machine.builder import MachineBuilder

    guest = Path(__file__).resolve().parents[1] / "kernels/guests/out/guest.elf"
    if not guest.exists():
        pytest.skip("test guest not built: make guests")
    t = Topology.parse(spec)
    m = MachineBuilder(str(guest), topology=t, memory="256M").build()
    try:
        ids = [struct.unpack_from("<I", vcpu_state.capture(v, []).lapic, 0x20)[0] >> 24
               for v in m.vcpus]
    finally:
        m.stop()
    assert ids == t.apic_ids()
    assert len(set(ids)) == t.cpus and (spec != "1n3l3c1t" or ids == [0, 1, 2, 4, 5, 6, 8, 9, 10])
