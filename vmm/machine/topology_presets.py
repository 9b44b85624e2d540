"""Named topologies (vmm.topology.presets()): 1 to 64 vCPUs, 1 to 4 NUMA nodes, 1 to 16
LLCs, with and without SMT; a name works wherever a spec does (Machine(topology=...),
`vmm run --topology`, the pytest markers). Shapes chosen to cover what topology-aware
schedulers branch on: one LLC or several per node, one node or several, SMT or not."""

from __future__ import annotations

PRESETS: dict[str, str] = {
    "uni": "1n1l1c1t",             # 1 CPU: no sched domains at all
    "smt-pair": "1n1l1c2t",        # 2: one core, two threads (SMT only)
    "quad": "1n1l4c1t",            # 4: one LLC (MC only)
    "quad-smt": "1n1l2c2t",        # 4: SMT + MC
    "llc2": "1n2l2c1t",            # 4: two LLCs in one node (MC + PKG)
    "numa2": "2n2l2c1t",           # 4: two nodes of one LLC (MC + NUMA)
    "llc2-smt": "1n2l2c2t",        # 8: SMT + MC + PKG
    "numa2-smt": "2n2l2c2t",       # 8: SMT + MC + NUMA
    "numa4": "4n4l2c1t",           # 8: four nodes
    "numa2-llc4-smt": "2n4l2c2t",  # 16: every level: SMT, MC, PKG, NUMA
    "numa4-llc8": "4n8l2c1t",      # 16: four nodes of two LLCs
    "llc16": "1n16l2c1t",          # 32: sixteen LLCs in one node
    "wide32": "1n1l32c1t",         # 32: one big LLC
    "numa4-llc16-smt": "4n16l2c2t",  # 64: four nodes, sixteen LLCs, SMT
    "llc8-smt64": "1n8l4c2t",      # 64: one node, eight LLCs, SMT
}

