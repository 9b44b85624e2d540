"""vmm.topology: the guest topology's public names (the implementation is
vmm/machine/topology.py, beside the tables it feeds).

    from vmm import topology
    topology.presets()                       # {name: spec}, 1 to 64 vCPUs
    t = topology.parse("2n4l2c2t")           # 2 nodes, 4 LLCs, 2 cores each, SMT2
    t.cpus, t.node_cpus(1), t.expected_sched_domains(0)
"""

from vmm.machine.topology import (LOCAL_DISTANCE, REMOTE_DISTANCE, Topology,  # noqa: F401
                                  presets)


def parse(spec, cpus=None, distances=None) -> Topology:
    """Topology.parse: a spec ("2n4l2c2t", old "2s4c2t"), a preset's name or a Topology."""
    return Topology.parse(spec, cpus, distances=distances)


__all__ = ["Topology", "parse", "presets", "LOCAL_DISTANCE", "REMOTE_DISTANCE"]
