"""The guest's CPU and memory topology as schedulers see it: NUMA nodes, LLCs, cores, SMT.

A spec `NnLlCcTt` names N NUMA nodes, L last-level caches in total (a multiple of N),
C cores per LLC and T threads per core: "2n4l2c2t" is 2 nodes of 2 LLCs of 2 cores of
2 threads, 16 CPUs. The older "SsCcTt" (sockets, cores, threads) still works: each
socket is one package with one LLC, and there is one NUMA node.

CPU numbering: CPU i is thread i % T of core (i // T) % C of LLC i // (T*C), and the
LLCs of node n are numbered n*L/N .. (n+1)*L/N - 1, so each node, LLC and core is a
run of consecutive CPUs. APIC ids are bit fields, as on hardware: thread | core | LLC
within the node | node, each field as wide as its count needs (a power of two). A
package (what CPUID's x2APIC leaves call the level above the cores) is a node, or one
socket of the old spec.

Memory: each node gets a part of guest RAM in address order (node 0 first), an equal
split by default; `with_memory({0: "1G", 1: "512M"})` sets each one, and a node
numbered past the CPU nodes holds memory only (a CXL-like tier). Distances (ACPI SLIT)
are 10 local and 20 remote unless given.

Everything the guest reads is derived from this one object: the APIC ids (MADT, MP
table), CPUID (vmm.machine.cpu), SRAT/SLIT (vmm.machine.tables), the e820 map and the
memory slots (node boundaries). `expected_sched_domains` says what Linux 7.x builds
from it, for tests to compare with the guest's own (vmm.kernel.sched_domains).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from vmm.errors import ConfigError
from vmm.machine import layout as L
from vmm.machine.topology_presets import PRESETS

NODE_ALIGN = 2 * L.MiB  # node boundaries: whole 2 MiB pages (the direct map's and KVM's unit)
MIN_NODE_MEMORY = 32 * L.MiB  # Linux drops tiny nodes; node 0 also holds the kernel
MAX_NODES = 8
MAX_LLCS = 64
LOCAL_DISTANCE = 10  # ACPI SLIT: the distance of a node to itself is 10 by definition
REMOTE_DISTANCE = 20

_SPEC_RE = re.compile(r"\s*(\d+)n(\d+)l(\d+)c(\d+)t\s*", re.IGNORECASE)
_LEGACY_RE = re.compile(r"\s*(\d+)s(\d+)c(\d+)t\s*", re.IGNORECASE)
EXAMPLE = "use e.g. '2n4l2c2t' (2 NUMA nodes, 4 LLCs in all, 2 cores per LLC, 2 threads per core)"


def _bits(count: int) -> int:
    """APIC id bits that number `count` things (0 for one)."""
    return (count - 1).bit_length()


@dataclass(frozen=True)
class Topology:
    """nodes x LLCs x cores x threads; see the module's docstring."""

    nodes: int = 1  # NUMA nodes with CPUs
    llcs: int = 1  # last-level caches in total
    cores: int = 1  # per LLC
    threads: int = 1  # per core
    legacy: bool = False  # "SsCcTt": every LLC is a package (socket) of its own
    node_memory: tuple[int, ...] | None = None  # bytes per node, memory-only nodes last
    distances: tuple[tuple[int, ...], ...] | None = None  # SLIT; None: 10 local, 20 remote

    # --- making one ---------------------------------------------------------------------
    @classmethod
    def flat(cls, cpus: int) -> "Topology":
        """`cpus` cores sharing one LLC, one thread each, one node."""
        return cls(1, 1, cpus, 1)

    @classmethod
    def sockets(cls, sockets: int, cores: int, threads: int) -> "Topology":
        """The old shape: `sockets` packages of `cores` x `threads`, one LLC each, one node."""
        return cls(1, sockets, cores, threads, legacy=True)

    @classmethod
    def parse(cls, spec, cpus: int | None = None, distances=None) -> "Topology":
        """A Topology from None (flat over `cpus`), a Topology, a preset's name, a spec
        ("2n4l2c2t", or the old "2s4c2t"), or a tuple (nodes, llcs, cores, threads) or
        (sockets, cores, threads). `cpus`, when given, must be what the spec implies.
        ConfigError names the part that is wrong."""
        if spec is None:
            if cpus is None:
                raise ConfigError("a topology needs a spec or a CPU count")
            topo = cls.flat(cpus)
        elif isinstance(spec, Topology):
            topo = spec
        elif isinstance(spec, (tuple, list)) and len(spec) == 3:
            topo = cls.sockets(*spec)
        elif isinstance(spec, (tuple, list)) and len(spec) == 4:
            topo = cls(*spec)
        elif isinstance(spec, str):
            if spec.strip() in PRESETS:
                spec = PRESETS[spec.strip()]
            m = _SPEC_RE.fullmatch(spec)
            legacy = _LEGACY_RE.fullmatch(spec)
            if m:
                topo = cls(*map(int, m.groups()))
            elif legacy:
                topo = cls.sockets(*map(int, legacy.groups()))
            else:
                raise ConfigError(f"topology {spec!r} is not understood; {EXAMPLE}, the old "
                                  f"'2s4c2t' (sockets, cores, threads) or a preset's name "
                                  f"(vmm.topology.presets())")
        else:
            raise ConfigError(f"topology must be a spec like '2n4l2c2t', a preset's name or a "
                              f"Topology, not {spec!r}")
        if distances is not None:
            # Before the nodes' memory is known, rows for memory-only nodes may follow.
            topo = replace(topo, distances=_distance_matrix(
                distances, topo.all_nodes, exact=topo.node_memory is not None))
        topo.check()
        if cpus is not None and topo.cpus != cpus:
            raise ConfigError(f"topology {topo.spec} has {topo.cpus} CPUs but cpus={cpus}; "
                              f"leave cpus out (the topology implies it) or make them agree")
        return topo

    def check(self) -> None:
        """ConfigError naming the first part of this topology that is wrong."""
        for name in ("nodes", "llcs", "cores", "threads"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"topology {self.spec}: {name} must be a positive integer, not {n!r}")
        if self.nodes > MAX_NODES:
            raise ConfigError(f"topology {self.spec}: {self.nodes} NUMA nodes; at most {MAX_NODES}")
        if self.llcs % self.nodes:
            raise ConfigError(f"topology {self.spec}: {self.llcs} LLCs do not divide among "
                              f"{self.nodes} nodes; give a multiple of {self.nodes} LLCs")
        if self.llcs > MAX_LLCS:
            raise ConfigError(f"topology {self.spec}: {self.llcs} LLCs; at most {MAX_LLCS}")
        if self.cpus > L.MAX_CPUS:
            raise ConfigError(f"topology {self.spec} has {self.cpus} CPUs; at most {L.MAX_CPUS}")
        top = self.apic_id(self.cpus - 1)
        if top > L.MAX_CPUS - 1:
            raise ConfigError(f"topology {self.spec} needs APIC id {top} (its fields are rounded up "
                              f"to powers of two); xAPIC ids stop at {L.MAX_CPUS - 1}: use counts "
                              f"that are powers of two")
        if self.distances is not None:
            _distance_matrix(self.distances, self.all_nodes, exact=self.node_memory is not None)

    def with_memory(self, memory_size: int, per_node=None) -> "Topology":
        """This topology with RAM given to its nodes: `memory_size` bytes split equally
        (in NODE_ALIGN units, the rest to the last node), or `per_node` ({node: size},
        sizes as bytes or "512M"): every CPU node must be named, and nodes past them
        (numbered on from `nodes`) hold memory only."""
        if per_node is None:
            unit = memory_size // self.nodes // NODE_ALIGN * NODE_ALIGN
            sizes = [unit] * (self.nodes - 1) + [memory_size - unit * (self.nodes - 1)]
            if self.nodes > 1 and unit < MIN_NODE_MEMORY:
                raise ConfigError(f"memory {memory_size >> 20} MiB split over {self.nodes} nodes "
                                  f"gives {unit >> 20} MiB each; each node needs at least "
                                  f"{MIN_NODE_MEMORY >> 20} MiB: give more memory")
        else:
            sizes = node_sizes(per_node, self.nodes)
        topo = replace(self, node_memory=tuple(sizes))
        if topo.distances is not None:
            _distance_matrix(topo.distances, topo.all_nodes)
        return topo

    # --- counts and fields --------------------------------------------------------------
    @property
    def cpus(self) -> int:
        return self.llcs * self.cores * self.threads

    @property
    def llcs_per_node(self) -> int:
        return self.llcs // self.nodes if self.nodes else 0

    @property
    def all_nodes(self) -> int:
        """Nodes with CPUs, then the memory-only ones."""
        return len(self.node_memory) if self.node_memory is not None else self.nodes

    @property
    def thread_bits(self) -> int:
        """Bits of the APIC id that number the threads of a core."""
        return _bits(self.threads)

    @property
    def core_bits(self) -> int:
        """Bits of the APIC id that number the cores of an LLC."""
        return _bits(self.cores)

    @property
    def llc_bits(self) -> int:
        """Bits of the APIC id that number the LLCs of a node."""
        return _bits(self.llcs_per_node)

    @property
    def package_shift(self) -> int:
        """APIC id bits below the package id (CPUID's x2APIC core level shift)."""
        low = self.thread_bits + self.core_bits
        return low if self.legacy else low + self.llc_bits

    @property
    def cpus_per_package(self) -> int:
        return self.cores * self.threads * (1 if self.legacy else self.llcs_per_node)

    @property
    def spec(self) -> str:
        if self.legacy:
            return f"{self.llcs}s{self.cores}c{self.threads}t"
        return f"{self.nodes}n{self.llcs}l{self.cores}c{self.threads}t"

    def __str__(self) -> str:
        return self.spec

    def thread_of(self, cpu: int) -> int:
        return cpu % self.threads

    def core_of(self, cpu: int) -> int:
        """The core's index within its LLC."""
        return cpu // self.threads % self.cores

    def llc_of(self, cpu: int) -> int:
        """The LLC's global index (0 .. llcs - 1)."""
        return cpu // (self.threads * self.cores)

    def node_of(self, cpu: int) -> int:
        return self.llc_of(cpu) // self.llcs_per_node

    def apic_id(self, cpu: int) -> int:
        """The APIC id of CPU `cpu`: thread | core | LLC within the node | node."""
        llc = self.llc_of(cpu)
        return ((((llc // self.llcs_per_node) << self.llc_bits | llc % self.llcs_per_node)
                 << self.core_bits | self.core_of(cpu)) << self.thread_bits | self.thread_of(cpu))

    def apic_ids(self) -> list[int]:
        """The APIC ids of every CPU, in CPU order (the MADT's order: Linux's CPU numbers)."""
        return [self.apic_id(i) for i in range(self.cpus)]

    # --- who shares what ----------------------------------------------------------------
    def thread_siblings(self, cpu: int) -> list[int]:
        first = cpu - self.thread_of(cpu)
        return list(range(first, first + self.threads))

    def llc_cpus(self, llc: int) -> list[int]:
        per = self.cores * self.threads
        return list(range(llc * per, (llc + 1) * per))

    def node_cpus(self, node: int) -> list[int]:
        """The CPUs of `node` (none for a memory-only node)."""
        if node >= self.nodes:
            return []
        per = self.llcs_per_node * self.cores * self.threads
        return list(range(node * per, (node + 1) * per))

    def distance(self, a: int, b: int) -> int:
        if self.distances is not None:
            return self.distances[a][b]
        return LOCAL_DISTANCE if a == b else REMOTE_DISTANCE

    def distance_matrix(self) -> list[list[int]]:
        n = self.all_nodes
        return [[self.distance(a, b) for b in range(n)] for a in range(n)]

    # --- memory -------------------------------------------------------------------------
    def memory_ranges(self, memory_size: int) -> list[tuple[int, int, int]]:
        """(node, gpa, size) of every node's RAM, in address order: node 0 from 0, each
        node's part of RAM split where it crosses the 32-bit MMIO gap."""
        sizes = self.node_memory if self.node_memory is not None else (memory_size,)
        if sum(sizes) != memory_size:
            raise ConfigError(f"the nodes' memory adds up to {sum(sizes)} bytes, not {memory_size}")
        out, offset = [], 0
        for node, size in enumerate(sizes):
            start, end = offset, offset + size
            offset = end
            for gpa, length in L.ram_regions(memory_size):
                base = gpa if gpa == 0 else L.MMIO_GAP_START  # RAM offset of this range
                lo, hi = max(start, base), min(end, base + length)
                if lo < hi:
                    out.append((node, gpa + (lo - base), hi - lo))
        return out

    def memory_boundaries(self, memory_size: int) -> list[int]:
        """Guest-physical addresses where one node's RAM ends and the next one's begins
        (where the e820 map and the memory slots are split too)."""
        ranges = self.memory_ranges(memory_size)
        return [gpa for (node, gpa, _), (prev, _, _) in zip(ranges[1:], ranges) if node != prev]

    # --- what Linux builds from it ------------------------------------------------------
    def expected_sched_domains(self, cpu: int) -> list[tuple[str, list[int]]]:
        """The sched domains Linux 7.x builds for `cpu`, lowest first, as (name, CPUs):
        x86's levels SMT (the core's threads), CLS (the L2's: the core's), MC (the LLC's),
        PKG (the node's: 7.x's tl_pkg_mask is the node mask), then NODE and one NUMA
        level per larger distance; a level spanning one CPU or no more than the level
        below it is dropped (the kernel's degenerate-domain rule), keeping the lower name."""
        node = self.node_of(cpu)
        levels = [("SMT", self.thread_siblings(cpu)), ("CLS", self.thread_siblings(cpu)),
                  ("MC", self.llc_cpus(self.llc_of(cpu))), ("PKG", self.node_cpus(node)),
                  ("NODE", self.node_cpus(node))]
        if self.all_nodes > 1:
            for d in sorted(set(self.distance(node, n) for n in range(self.all_nodes)) - {LOCAL_DISTANCE}):
                cpus = [c for n in range(self.all_nodes) if self.distance(node, n) <= d
                        for c in self.node_cpus(n)]
                levels.append(("NUMA", sorted(cpus)))
        out: list[tuple[str, list[int]]] = []
        for name, span in levels:
            if len(span) <= 1 or (out and out[-1][1] == span):
                continue
            out.append((name, span))
        return out


def node_sizes(per_node, cpu_nodes: int) -> list[int]:
    """Bytes per node from {node: size}, checked (ConfigError names the wrong part)."""
    if not isinstance(per_node, dict) or not per_node:
        raise ConfigError(f"per-node memory must be a dict like {{0: '1G', 1: '512M'}}, not {per_node!r}")
    keys = sorted(per_node)
    if any(isinstance(k, bool) or not isinstance(k, int) for k in keys) or keys != list(range(len(keys))):
        raise ConfigError(f"per-node memory names nodes {keys}; name them 0, 1, 2, ... with none left out")
    if len(keys) < cpu_nodes:
        raise ConfigError(f"per-node memory names {len(keys)} nodes but the topology has {cpu_nodes} "
                          f"nodes with CPUs; give each of them memory")
    if len(keys) > MAX_NODES:
        raise ConfigError(f"per-node memory names {len(keys)} nodes; at most {MAX_NODES}")
    sizes = []
    for node in keys:
        size = per_node[node]
        if isinstance(size, str):
            size = L.parse_size(size)
        if isinstance(size, bool) or not isinstance(size, int):
            raise ConfigError(f"node {node}'s memory must be bytes or a size like '512M', not {size!r}")
        if size % NODE_ALIGN or size < MIN_NODE_MEMORY:
            raise ConfigError(f"node {node}'s memory ({size} bytes) must be a multiple of "
                              f"{NODE_ALIGN >> 20} MiB and at least {MIN_NODE_MEMORY >> 20} MiB")
        sizes.append(size)
    return sizes


def _distance_matrix(distances, nodes: int, exact: bool = True) -> tuple[tuple[int, ...], ...]:
    """A SLIT matrix from an int (every remote distance) or a square list of lists;
    `exact`: of exactly `nodes` rows (else at least: memory-only nodes not yet given)."""
    if isinstance(distances, int) and not isinstance(distances, bool):
        distances = [[LOCAL_DISTANCE if a == b else distances for b in range(nodes)] for a in range(nodes)]
    try:
        matrix = tuple(tuple(int(d) for d in row) for row in distances)
    except (TypeError, ValueError):
        raise ConfigError(f"distances must be a remote distance or a {nodes}x{nodes} matrix, "
                          f"not {distances!r}") from None
    n = len(matrix)
    if (n != nodes if exact else n < nodes) or any(len(row) != n for row in matrix):
        raise ConfigError(f"distances must be a {nodes}x{nodes} matrix (one row per node, "
                          f"memory-only nodes included), not {n} rows")
    for a in range(n):
        for b in range(n):
            d = matrix[a][b]
            if a == b and d != LOCAL_DISTANCE:
                raise ConfigError(f"distance of node {a} to itself must be {LOCAL_DISTANCE}, not {d}")
            if a != b and not LOCAL_DISTANCE < d <= 254:
                raise ConfigError(f"distance {a}->{b} must be 11..254 (ACPI SLIT), not {d}")
    return matrix


def presets() -> dict[str, str]:
    """{name: spec} of every preset (vmm/machine/topology_presets.py), fewest CPUs first."""
    return dict(sorted(PRESETS.items(), key=lambda kv: (Topology.parse(kv[1]).cpus, kv[0])))
