"""The tasks queued on a stalled CPU (vmm/kernel/rq_tasks.py), in the stall report
(vmm/kernel/stall_dump.py) and in the monitor's stalls() (vmm/runtime/monitor.py).

The walk of ``rq->scx.runnable_list`` against the real BTF of our Linux 7.3 build
(skipped when it is not built), over a sparse fake memory laid out at its offsets: the
tasks in list order with pid and comm, and the untrusted-memory cases (a cycle, a NULL
next pointer, a list longer than the limit). Our test guest has no task_struct, so the
real-kernel check is the SVM lane's (tests/test_scx_linux.py, scx_qmap -t).
"""

import glob
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from kfixture import FakeLive  # noqa: E402

from vmm.errors import VmmError  # noqa: E402
from vmm.kernel.rq_tasks import TaskListLayout, queued_on, queued_tasks  # noqa: E402
from vmm.kernel.stall_dump import capture_report  # noqa: E402
from vmm.runtime.monitor import Monitor, Sample, Stall  # noqa: E402

RQ = [0xFFFF888001000000, 0xFFFF888001100000]     # runqueues of cpu 0, 1
TASKS = 0xFFFF888002000000                         # task_structs, 0x4000 apart


@pytest.fixture(scope="module")
def k73():
    from vmm.kernel import Kernel
    found = sorted(glob.glob(str(Path.home() / ".cache/vmm/kernels/build/7.3-*/vmlinux")))
    if not found:
        pytest.skip("Linux 7.3 is not built (~/.cache/vmm/kernels/build/7.3-*/vmlinux): "
                    "make kernel-build; the task list walk is checked against its BTF")
    return Kernel.load(vmlinux=found[0])


class Live(FakeLive):
    def per_cpu_address(self, name, cpu, path=None):
        assert name == "runqueues"
        return RQ[cpu] + (self.kernel.btf.offsetof("struct rq", path) if path else 0)

    def read(self, name, path=None, cpu=None):  # what read_rq_rows asks
        raise VmmError(f"no {path} here")


def lay_tasks(live, lay, cpu, tasks, link=None):
    """tasks [(pid, comm)] on cpu's runnable list; link(i) overrides task i's next."""
    head = live.per_cpu_address("runqueues", cpu, lay.head_path)
    nodes = [TASKS + 0x4000 * (cpu * 100 + i) + lay.node_off for i in range(len(tasks))]
    chain = nodes + [head]
    live.u64(head, chain[0])
    for i, (pid, comm) in enumerate(tasks):
        task = nodes[i] - lay.node_off
        live.put(task + lay.pid_off, struct.pack("<i", pid))
        live.put(task + lay.comm_off, comm.ljust(16, b"\0"))
        live.u64(task + lay.runnable_at_off, 1000 + i)
        live.u64(nodes[i], link(i) if link and link(i) is not None else chain[i + 1])
    return nodes


def test_runnable_list_walk(k73):
    live = Live(k73)
    lay = TaskListLayout.of(k73)
    assert lay.head_path == "scx.runnable_list"
    assert lay.node_off == k73.btf.offsetof("struct task_struct", "scx.runnable_node")
    lay_tasks(live, lay, 1, [(101, b"stress"), (7, b"kworker/1:0"), (1, b"init")])
    lay_tasks(live, lay, 0, [])
    assert queued_tasks(live, 1).jiffies is None  # jiffies_64 unreadable: waits unknown
    live.u64(live.symbol_address("jiffies_64"), 1500)
    q = queued_tasks(live, 1)
    assert [q.waited(t) for t in q.tasks] == [500, 499, 498]
    assert "101 'stress' (runnable 500 jiffies)" in q.describe()
    assert [(t.pid, t.comm) for t in q.tasks] == [(101, "stress"), (7, "kworker/1:0"), (1, "init")]
    assert not q.truncated and q.error is None and q.source == "rq->scx.runnable_list"
    assert queued_tasks(live, 0).tasks == [] and "none" in queued_tasks(live, 0).describe()
    q = queued_tasks(live, 1, limit=2)
    assert len(q.tasks) == 2 and q.truncated and "first 2 only" in q.describe()


def test_untrusted_lists_end_bounded(k73):
    live = Live(k73)
    lay = TaskListLayout.of(k73)
    nodes = lay_tasks(live, lay, 1, [(1, b"a"), (2, b"b"), (3, b"c")],
                      link=lambda i: None if i < 2 else 0)      # NULL where the head was
    q = queued_tasks(live, 1)
    assert [t.pid for t in q.tasks] == [1, 2, 3] and "NULL next pointer" in q.error
    lay_tasks(live, lay, 1, [(1, b"a"), (2, b"b")], link=lambda i: None if i == 0 else nodes[0])
    q = queued_tasks(live, 1, limit=1000)                       # b -> a -> b -> ...
    assert [t.pid for t in q.tasks] == [1, 2] and "cycle" in q.error
    live.u64(live.per_cpu_address("runqueues", 1, lay.head_path), 0xFFFF888777000000)
    q = queued_tasks(live, 1)                                   # into unbacked memory
    assert q.tasks == [] and "unreadable" in q.error
    with pytest.raises(VmmError, match="limit"):
        queued_tasks(live, 1, limit=-1)


def test_the_stall_report_names_the_queued_tasks(k73):
    live = Live(k73)
    lay = TaskListLayout.of(k73)
    lay_tasks(live, lay, 1, [(4242, b"qmap_stalled")])
    stall = Stall(1, 0.0, 1.0, 1, 1, 500, 0.9, 11)
    rep = capture_report([stall], live, [0, 1], [], 1.1, lambda: None)
    assert [t.pid for t in rep.queued[1].tasks] == [4242] and 0 not in rep.queued
    assert "cpu 1 queued (rq->scx.runnable_list): 4242 'qmap_stalled'" in rep.describe()


def test_a_kernel_without_the_list_says_so():
    from vmm.kernel import Kernel
    guest = Path(__file__).resolve().parents[1] / "kernels/guests/out/guest.elf"
    if not guest.exists():
        pytest.skip("the test guest is not built: make guests")
    live = Live(Kernel.load(vmlinux=guest))
    with pytest.raises(VmmError, match="no sched_ext task list"):
        queued_on(live, [0])
    rep = capture_report([Stall(0, 0.0, 1.0, 1, 0, 5, 1.0, 11)], live, [0], [], 1.0, lambda: None)
    assert rep.queued == {} and "no sched_ext task list" in rep.describe()


class Words:
    def __init__(self):
        self.data = bytearray(64)

    def read_u64(self, gpa):
        return int.from_bytes(self.data[gpa:gpa + 8], "little")

    read_u8 = read_u16 = read_u32 = read_u64


def test_monitor_stalls_name_the_tasks_of_an_ongoing_stall():
    asked = []

    def tasks_of(cpus):
        asked.append(cpus)
        return {c: f"tasks of {c}" for c in cpus}

    mon = Monitor(Words(), [0, 1], ["nr_running", "clock"], [(0, 0, 8), (0, 8, 8), (1, 16, 8),
                                                             (1, 24, 8)], tasks_of=tasks_of)
    for i in range(21):  # cpu 0 stalled throughout; cpu 1 stalled for the first 1.2 s only
        mon.samples.append(Sample(i * 0.1, (i * 0.1, i * 0.1),
                                  ({"nr_running": 1, "clock": 5},
                                   {"nr_running": 1 if i <= 12 else 0, "clock": 7})))
    found = mon.stalls(window_s=1.0)
    assert [(s.cpu, s.tasks) for s in found] == [(0, "tasks of 0"), (1, None)]
    assert asked == [[0]] and "; tasks of 0" in found[0].describe()
    assert all(s.tasks is None for s in mon.stalls(window_s=1.0, tasks=False))
    assert len(asked) == 1
