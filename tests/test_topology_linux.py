"""The guest's own kernel sees the topology the spec names (SVM lane: guest user space
makes system calls; `make test-svm` runs it).

One boot per case (build:7.3, whose fragment has ACPI NUMA, SCHED_MC, SCHED_SMT): a
guest job prints /sys/devices/system/node/node*/{cpulist,distance,meminfo},
cpu*/cache/index3/shared_cpu_list and cpu*/topology/thread_siblings_list, and the sched
domains the kernel printed at boot (`sched_verbose`: "domain-N: span=... level=NAME",
read back with dmesg), then waits while the host reads every CPU's sched domains
through BTF (m.sched_domains); all of it must equal what the spec says
(Topology.expected_sched_domains and friends). Lane cost: four boots of 4 to 16
vCPUs, about a minute each under the lane's nested TCG.
"""

import re

import pytest

from guest_abi import built_kernel_spec, guest_syscall_marks
from vmm.machine.builder import DEFAULT_LINUX_CMDLINE

pytestmark = [pytest.mark.slow, pytest.mark.svm, *guest_syscall_marks()]

BOOT_TIMEOUT = 900

JOB = r"""
for n in /sys/devices/system/node/node[0-9]*; do
  echo "vmm-topo: node ${n##*node} cpus=[$(cat $n/cpulist)] distance=[$(cat $n/distance)] mem=$(grep -o 'MemTotal: *[0-9]*' $n/meminfo | grep -o '[0-9]*$')"
done
for c in /sys/devices/system/cpu/cpu[0-9]*; do
  echo "vmm-topo: cpu ${c##*cpu} llc=[$(cat $c/cache/index3/shared_cpu_list 2>/dev/null)] smt=[$(cat $c/topology/thread_siblings_list)]"
done
dmesg | grep -E 'CPU[0-9]+ attaching sched-domain|domain-[0-9]+: span=' | sed 's/^/vmm-topo: dmesg /'
echo "vmm-topo: done"
read -r answer
exit 0
"""

CASES = {
    # every level: SMT, MC, PKG (two LLCs per node), NUMA
    "numa2-llc4-smt": dict(topology="numa2-llc4-smt"),
    # one node, two LLCs: MC and PKG, no SRAT at all
    "llc2": dict(topology="llc2"),
    # 3 cores per LLC: APIC ids with gaps (0, 1, 2, 4, 5, 6, 8, 9, 10); each vCPU must
    # be created with its id or the guest's INIT/SIPI go to ids no vCPU has
    "llc3-core3": dict(topology="1n3l3c1t"),
    # a memory-only third node (a CXL-like tier) at distance 30, per-node memory
    "numa2+memory-node": dict(topology="numa2", memory={0: "256M", 1: "256M", 2: "128M"},
                              distances=[[10, 20, 30], [20, 10, 30], [30, 30, 10]]),
}


def cpulist(cpus) -> str:
    """Linux's cpulist format ("0-3,8-11") of a sorted list."""
    out, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def parse_cpulist(text: str) -> list[int]:
    out = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_guest_sees_the_spec(case):
    from vmm.machine.topology import Topology

    opts = dict(CASES[case])
    topo = Topology.parse(opts.pop("topology"), distances=opts.pop("distances", None))
    boot_and_check(topo, **opts)


def boot_and_check(topo, freezes: int = 0, **opts) -> dict:
    """Boots build:7.3 with `topo`, checks what the guest and the host's BTF reading see
    against the spec; returns the seconds to "Run /init" and, with `freezes`, the freeze
    rendezvous' latencies (ms) over that many cycles."""
    import time

    from vmm import Machine

    m = Machine(kernel=built_kernel_spec(), topology=topo, exec=JOB, console=None,
                cmdline=DEFAULT_LINUX_CMDLINE + " sched_verbose", timeout=BOOT_TIMEOUT, **opts)
    figures = {}
    with m:
        t0 = time.monotonic()
        m.wait_for_console(r"Run /init as init process", timeout=BOOT_TIMEOUT)
        figures["boot_s"] = time.monotonic() - t0
        m.wait_for_console(r"vmm-topo: done", timeout=BOOT_TIMEOUT)
        text = m.console_text()
        t = m.topology  # with the nodes' memory
        from_host = {cpu: [(d.name, list(d.cpus)) for d in m.sched_domains(cpu)] for cpu in range(t.cpus)}
        lat = []
        for _ in range(freezes):
            with m.freeze() as snap:
                lat.append(snap.latency_ns / 1e6)
        if lat:
            lat.sort()
            figures["freeze_p50_ms"] = lat[len(lat) // 2]
            figures["freeze_p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        m.feed_console(b"bye\n")
    check_guest_view(t, text, from_host)
    return figures


def check_guest_view(t, text: str, from_host: dict) -> None:
    """What the guest printed (JOB) and the host read (m.sched_domains) equal the spec."""
    where = f"\n--- console tail ---\n{text[-4000:]}"
    nodes = {int(n): (c, d, int(mem or 0)) for n, c, d, mem in
             re.findall(r"vmm-topo: node (\d+) cpus=\[([^\]]*)\] distance=\[([^\]]*)\] mem=(\d*)", text)}
    assert sorted(nodes) == list(range(t.all_nodes)), where
    for n, (cpus, distance, mem_kb) in nodes.items():
        assert cpus == cpulist(t.node_cpus(n)), (n, where)
        assert [int(x) for x in distance.split()] == t.distance_matrix()[n], (n, where)
        # the node's RAM, less what the kernel reserved for itself there
        assert 0.5 * t.node_memory[n] < mem_kb * 1024 <= t.node_memory[n], (n, mem_kb, where)

    cpus = {int(c): (llc, smt) for c, llc, smt in
            re.findall(r"vmm-topo: cpu (\d+) llc=\[([^\]]*)\] smt=\[([^\]]*)\]", text)}
    assert sorted(cpus) == list(range(t.cpus)), where
    for c, (llc, smt) in cpus.items():
        assert parse_cpulist(llc) == t.llc_cpus(t.llc_of(c)), (c, where)
        assert parse_cpulist(smt) == t.thread_siblings(c), (c, where)

    # the host's reading through BTF: every CPU, every level
    for c in range(t.cpus):
        assert from_host[c] == t.expected_sched_domains(c), (c, from_host[c])
    # what the kernel printed when it attached each CPU's domains, by domain index: a
    # line garbled on the console (the lane saw an NMI backtrace land amid them) is
    # missing, never wrong
    printed: dict[int, dict] = {}
    cpu = None
    for line in text.splitlines():
        if (a := re.search(r"CPU(\d+) attaching sched-domain", line)):
            cpu = int(a.group(1))
            printed[cpu] = {}
        elif (d := re.search(r"domain-(\d+): span=([0-9,-]+) level=(\w+)", line)) and cpu is not None:
            printed[cpu][int(d.group(1))] = (d.group(3), parse_cpulist(d.group(2)))
    for c in range(t.cpus):
        want = t.expected_sched_domains(c)
        got = printed.get(c, {})
        assert all(i < len(want) and got[i] == want[i] for i in got), (c, got, want, where)
        assert not want or len(got) >= len(want) - 1, (c, got, want, where)
