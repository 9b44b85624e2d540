"""Catching a sched_ext exit however short the scheduler's life: a write watchpoint on
``scx_root``.

Polling ``m.scx.state()`` sees an exit only while the exited scheduler is still linked
at ``scx_root``: from the claim of the exit to the end of the disable work. A scheduler
that errors out a few hundred enqueues after attaching (``scx_qmap -e 200``) can live
and die between two polls, more so when the host is slow (the SVM lane's Python runs
under TCG). The kernel writes ``scx_root`` exactly twice per scheduler (Linux 7.3,
kernel/sched/ext/ext.c): ``rcu_assign_pointer(scx_root, sch)`` when it attaches, and
``RCU_INIT_POINTER(scx_root, NULL)`` in scx_root_disable(), after scx_disable_workfn()
wrote ``exit_info->kind`` and ``->reason`` (the message was written at the claim) and
before the scheduler is freed (kobject release, after an RCU grace period). A hardware
watchpoint on that word freezes the guest right after each write; at the NULL write the
old pointer (the watch's ``old``) still names a whole scx_sched with its exit info,
read then in that freeze.

The watchpoint itself is the session's (``m.watch``: DR0-DR3 through KVM guest debug);
this module only says what to do at each hit. Where data watchpoints never hit (PVM's
emulated ring 0) the session does not arm it and waiting falls back to polling alone.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional


class ExitCatcher:
    """The scx_root watch's bookkeeping: ``attached`` (scx_sched pointers seen written),
    ``exits`` (ScxState of every scheduler seen unlinked, read at that instant), and an
    event set at each exit. ``read_detached(live, sch)`` reads a detached scheduler's
    state (ScxView passes its layout-bound reader); ``arm(on_hit)`` arms the watch and
    returns its handle (``.remove()``)."""

    def __init__(self, read_detached: Callable[[Any, int], Any],
                 arm: Callable[[Callable[[Any], None]], Any]):
        self._read_detached = read_detached
        self.attached: list[int] = []
        self.exits: list[Any] = []
        self.errors: list[BaseException] = []
        self.event = threading.Event()
        self._handle = arm(self._on_hit)

    def _on_hit(self, ctx) -> None:
        old, new = ctx.old, ctx.new
        if new:
            self.attached.append(new)
            return
        if not old:
            return
        try:
            self.exits.append(self._read_detached(ctx.live, old))
        except Exception as exc:  # a hit must never break the guest's run
            self.errors.append(exc)
        self.event.set()

    def take(self) -> Optional[Any]:
        """The oldest caught exit not yet taken, or None."""
        if not self.exits:
            self.event.clear()
            return None
        return self.exits.pop(0)

    def close(self) -> None:
        """Disarms the watchpoint (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()
