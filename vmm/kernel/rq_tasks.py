"""The tasks queued on a CPU, read from guest memory: what a stall report names.

sched_ext keeps every runnable task of a run queue on ``rq->scx.runnable_list``
(``list_add_tail(&p->scx.runnable_node, &rq->scx.runnable_list)`` in Linux 7.3's
kernel/sched/ext/ext.c, removed when the task stops being runnable); the tasks a
scheduler dispatched to the CPU wait on its local DSQ, ``rq->scx.local_dsq.list``
(``task_struct.scx.dsq_list.node``). :func:`queued_tasks` walks the first the kernel has
(BTF decides) and gives each task's ``pid`` and ``comm``.

Guest memory is untrusted and the list may change under an unfrozen read, so the walk is
bounded: at most ``limit`` tasks (the rest counted as cut off), a node seen twice ends it
(a cycle), a NULL or misaligned pointer or one that does not translate ends it with the
reason. Read while frozen (the stall watch's capture) the list is one instant.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from vmm.errors import VmmError

#: The lists tried, in order: (rq member path of the list head, task_struct member path
#: of the node that links a task into it).
TASK_LISTS = (("scx.runnable_list", "scx.runnable_node"),
              ("scx.local_dsq.list", "scx.dsq_list.node"))
DEFAULT_LIMIT = 64   # tasks named per CPU at most
COMM_LEN = 16        # TASK_COMM_LEN when BTF does not say


@dataclass(frozen=True)
class QueuedTask:
    pid: int
    comm: str
    kva: int   # the task_struct
    runnable_at: Optional[int] = None   # p->scx.runnable_at (jiffies), where BTF has it


@dataclass
class QueuedTasks:
    """The tasks on one CPU's list ``source`` (rq member path), in list order;
    ``truncated``: the walk stopped at the limit with more to go; ``error``: why it
    stopped early (a bad pointer, a cycle), None when it reached the list's end."""

    cpu: int
    source: str
    tasks: list[QueuedTask] = field(default_factory=list)
    truncated: bool = False
    error: Optional[str] = None
    jiffies: Optional[int] = None   # jiffies_64 when the list was read

    def waited(self, task: QueuedTask) -> Optional[int]:
        """Jiffies ``task`` has been runnable without running (the kernel's watchdog
        compares the same: jiffies - p->scx.runnable_at), None when unknown."""
        if task.runnable_at is None or self.jiffies is None:
            return None
        return self.jiffies - task.runnable_at

    def describe(self) -> str:
        def one(t: QueuedTask) -> str:
            w = self.waited(t)
            return f"{t.pid} {t.comm!r}" + (f" (runnable {w} jiffies)" if w is not None else "")
        names = ", ".join(one(t) for t in self.tasks) or "none"
        text = f"cpu {self.cpu} queued ({self.source}): {names}"
        if self.truncated:
            text += f" (first {len(self.tasks)} only)"
        if self.error:
            text += f" [walk stopped: {self.error}]"
        return text

    def as_dict(self) -> dict:
        return {"cpu": self.cpu, "source": self.source, "truncated": self.truncated,
                "error": self.error, "jiffies": self.jiffies,
                "tasks": [{"pid": t.pid, "comm": t.comm, "runnable_at": t.runnable_at}
                          for t in self.tasks]}


@dataclass(frozen=True)
class TaskListLayout:
    head_path: str       # in struct rq
    node_off: int        # of the list node in task_struct
    pid_off: int
    comm_off: int
    comm_len: int
    runnable_at_off: Optional[int] = None   # task_struct.scx.runnable_at (8 bytes)

    @classmethod
    def of(cls, kernel: Any) -> "TaskListLayout":
        """The first of TASK_LISTS this kernel's BTF has; VmmError naming what is missing."""
        if not kernel.has_btf:
            raise VmmError("this kernel has no BTF (CONFIG_DEBUG_INFO_BTF): the queued tasks "
                           "are found through it")
        btf = kernel.btf
        why = []
        for head, node in TASK_LISTS:
            try:
                btf.field("struct rq", head)
                n = btf.field("struct task_struct", node)
                pid = btf.field("struct task_struct", "pid")
                comm = btf.field("struct task_struct", "comm")
            except VmmError as e:
                why.append(f"{head}: {e}")
                continue
            try:
                at = btf.field("struct task_struct", "scx.runnable_at")
                at_off = at.offset if at.size == 8 and not at.bit_size else None
            except VmmError:
                at_off = None
            return cls(head, n.offset, pid.offset, comm.offset, min(comm.size or COMM_LEN, 64),
                       at_off)
        raise VmmError("no sched_ext task list in this kernel (" + "; ".join(why) + ")")


def queued_tasks(live: Any, cpu: int, limit: int = DEFAULT_LIMIT, symbol: str = "runqueues",
                 layout: Optional[TaskListLayout] = None) -> QueuedTasks:
    """The tasks on CPU ``cpu``'s sched_ext list (see the module doc), at most ``limit``.
    ``live``: a LiveKernel (frozen for one instant). VmmError when the kernel has no
    such list; a bad list in memory is reported in the result, not raised."""
    if limit < 0:
        raise VmmError(f"limit must be >= 0, not {limit}")
    lay = layout or TaskListLayout.of(live.kernel)
    head = live.per_cpu_address(symbol, cpu, lay.head_path)
    out = QueuedTasks(cpu, f"rq->{lay.head_path}")

    def u64(kva: int) -> int:
        return struct.unpack("<Q", live.read_kva(kva, 8))[0]

    if "jiffies_64" in live.kernel.symbols:
        try:
            out.jiffies = u64(live.symbol_address("jiffies_64"))
        except VmmError:
            pass
    try:
        node = u64(head)  # head->next
    except VmmError as e:
        out.error = f"list head at {head:#x} unreadable: {e}"
        return out
    seen = {head}
    while node != head:
        if len(out.tasks) >= limit:
            out.truncated = True
            break
        if node == 0 or node % 8:
            out.error = f"a {'NULL' if node == 0 else 'misaligned'} next pointer ({node:#x})"
            break
        if node in seen:
            out.error = f"a cycle: node {node:#x} seen twice"
            break
        seen.add(node)
        task = (node - lay.node_off) & (1 << 64) - 1
        try:
            pid = struct.unpack("<i", live.read_kva(task + lay.pid_off, 4))[0]
            raw = live.read_kva(task + lay.comm_off, lay.comm_len)
            at = u64(task + lay.runnable_at_off) if lay.runnable_at_off is not None else None
            nxt = u64(node)
        except VmmError as e:
            out.error = f"task at {task:#x} unreadable: {e}"
            break
        comm = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        out.tasks.append(QueuedTask(pid, comm, task, at))
        node = nxt
    return out


def queued_on(live: Any, cpus, limit: int = DEFAULT_LIMIT) -> dict[int, QueuedTasks]:
    """queued_tasks for each of ``cpus`` ({} when the kernel has no such list: the
    reason is raised as VmmError)."""
    lay = TaskListLayout.of(live.kernel)
    return {cpu: queued_tasks(live, cpu, limit, layout=lay) for cpu in cpus}
