"""CPUID that describes the guest's topology (vmm.machine.topology) to its kernel: the
APIC id and logical processor count of leaf 1, the x2APIC topology leaves 0xB/0x1F, the
cache leaves 4 and 0x8000001D (which CPUs share each cache: L3 = one LLC), AMD's
TOPOEXT and 0x8000001E, and AMD's legacy L1/L2 leaves where KVM lists them empty.

Pure functions over KVM's CPUID lists (dicts with function, index, flags, eax..edx),
unit-tested; vmm.machine.cpu applies them to each vCPU.
"""

from __future__ import annotations

import struct

from vmm.machine.topology import Topology

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
        fn = e["function"]
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
