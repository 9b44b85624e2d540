"""Every topology preset booted once (SVM lane, a slow job: `make test-svm-topology`).

Each preset boots build:7.3 (ACPI NUMA, SCHED_MC, SCHED_SMT), and what its guest reads
(nodes, distances, per-node memory, LLC and SMT sibling lists, the sched domains it
printed) and what the host reads through BTF (m.sched_domains) must equal the spec
(tests/test_topology_linux.py's checks). Each also prints its figures: seconds to
"Run /init" and the freeze rendezvous' p50/p99 over 50 cycles, one JSON line per preset
("vmm-topology-figures"). Not in `make test-svm`: the 32- and 64-vCPU boots take minutes
each under the lane's nested TCG (the whole job's cost is in README "Topology").
"""

import json

import pytest

from guest_abi import guest_syscall_marks
from test_topology_linux import boot_and_check

from vmm import topology

pytestmark = [pytest.mark.slow, pytest.mark.svm, *guest_syscall_marks()]


@pytest.mark.parametrize("preset", list(topology.presets()))
def test_preset_boots_as_specified(preset):
    topo = topology.parse(preset)
    figures = boot_and_check(topo, freezes=50)
    print("vmm-topology-figures " + json.dumps({"preset": preset, "spec": topology.presets()[preset],
                                                "cpus": topo.cpus, **figures}))
