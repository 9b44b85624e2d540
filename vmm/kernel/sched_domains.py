"""The guest kernel's sched domains for one CPU, read from the host through BTF.

Linux keeps each CPU's domain hierarchy at ``rq->sd`` (the per-CPU ``runqueues``): the
lowest ``struct sched_domain``, whose ``->parent`` leads up to the top one (NULL
there). Each has a ``level``, ``flags``, a ``name`` (a pointer to the topology level's
name: "SMT", "MC", "PKG", "NUMA"...; always there in 7.x, only with CONFIG_SCHED_DEBUG
before 6.15) and its span: a cpumask allocated right after the struct (7.x's
sched_domain_span() reads it at ``sizeof(struct sched_domain)``; kernels that still
declare ``unsigned long span[]`` have it at that member's offset).

Everything read is guest data, so the walk is bounded: at most MAX_LEVELS domains, a
pointer seen twice ends it (a loop), names of at most MAX_NAME bytes, spans of
nr_cpu_ids bits. Read it with the guest frozen (m.sched_domains does), or the
hierarchy may be rebuilt (CPU hotplug, cpusets) under the walk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmm.errors import KernelFeatureMissing, TranslationError

MAX_LEVELS = 16  # x86 has SMT, CLS, MC, PKG, NODE and one NUMA level per distance
MAX_NAME = 32


@dataclass(frozen=True)
class SchedDomain:
    """One level of a CPU's sched domain hierarchy, lowest first."""

    level: int  # sd->level: 0 at the bottom
    name: str | None  # "SMT", "MC", "PKG", "NUMA"...; None where the kernel keeps no name
    cpus: tuple[int, ...]  # the span
    flags: int  # SD_* bits
    address: int  # the struct's kernel virtual address

    def __str__(self) -> str:
        return f"{self.name or '?'}{list(self.cpus)}"


def _cpulist(raw: bytes, nbits: int) -> tuple[int, ...]:
    bits = int.from_bytes(raw, "little")
    return tuple(c for c in range(nbits) if bits >> c & 1)


def read_sched_domains(live, cpu: int) -> list[SchedDomain]:
    """CPU `cpu`'s sched domains, lowest first, through `live` (a LiveKernel); [] when it
    has none (one CPU, or domains not built yet)."""
    kernel = live.kernel
    if not kernel.has_btf:
        raise KernelFeatureMissing("this kernel has no BTF (CONFIG_DEBUG_INFO_BTF): the sched "
                                   "domains are found through it")
    btf = kernel.btf
    try:
        sd_type = btf.type("struct sched_domain")
    except Exception as e:
        raise KernelFeatureMissing(f"no struct sched_domain in this kernel's BTF ({e})") from None
    size = btf.sizeof(sd_type)
    names = set(btf.member_names(sd_type))
    for needed in ("parent", "level", "flags"):
        if needed not in names:
            raise KernelFeatureMissing(f"struct sched_domain has no '{needed}' in this kernel's BTF")
    off = {n: btf.field(sd_type, n).offset for n in ("parent", "level", "flags")}
    name_off = btf.field(sd_type, "name").offset if "name" in names else None
    span_off = btf.field(sd_type, "span").offset if "span" in names else size
    nbits = live.nr_cpu_ids()
    if not 0 < nbits <= 8192:
        raise TranslationError(f"nr_cpu_ids reads {nbits}: not a plausible CPU count")
    span_bytes = (nbits + 63) // 64 * 8
    ptr = live.read("runqueues", "sd", cpu=cpu)
    out: list[SchedDomain] = []
    seen = set()
    while ptr and len(out) < MAX_LEVELS and ptr not in seen:
        seen.add(ptr)
        raw = live.read_kva(ptr, size)
        parent = struct.unpack_from("<Q", raw, off["parent"])[0]
        level = struct.unpack_from("<i", raw, off["level"])[0]
        flags = struct.unpack_from("<i", raw, off["flags"])[0]
        name = None
        if name_off is not None:
            name_ptr = struct.unpack_from("<Q", raw, name_off)[0]
            if name_ptr:
                text = live.read_kva(name_ptr, MAX_NAME).split(b"\0", 1)[0]
                name = text.decode("ascii", "replace")
        cpus = _cpulist(live.read_kva(ptr + span_off, span_bytes), nbits)
        out.append(SchedDomain(level, name, cpus, flags & 0xFFFFFFFF, ptr))
        ptr = parent
    return out
