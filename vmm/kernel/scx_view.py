"""``m.scx``: sched_ext's state from the host as a machine's view (ScxView): state(),
wait_for_exit(), the watchdog timeout. The reading itself is vmm/kernel/scx_state.py;
catching a short-lived scheduler's exit, vmm/kernel/scx_exit_watch.py.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

from vmm.errors import KernelFeatureMissing, VmmError
from vmm.kernel.scx_state import (ScxLayout, ScxState, ScxTimeout, _read_once, _u64,
                                  read_state)


class ScxView:
    """``m.scx``: sched_ext's state from the host (vmm.session builds it).

    live: () -> a live view of the kernel (LiveKernel, cached by the session);
    freeze: () -> a context manager that parks every vCPU (the session's freeze);
    frozen: () -> True while the caller already holds a freeze;
    write_u64: (kva, value) -> None, a checked cold write (the session's ops path);
    hz: () -> CONFIG_HZ or None; running: () -> whether the VM still runs;
    watch_root: (on_hit) -> a write watchpoint on ``scx_root`` calling on_hit(ctx) (ctx.old,
    ctx.new, ctx.live) in a freeze, with ``.remove()``; None where data watchpoints do
    not hit (then exits are polled only; vmm/kernel/scx_exit_watch.py).
    """

    def __init__(self, kernel, live: Callable[[], Any],
                 freeze: Callable[[], ContextManager] = lambda: nullcontext(),
                 frozen: Callable[[], bool] = lambda: False,
                 write_u64: Optional[Callable[[int, int], Any]] = None,
                 hz: Callable[[], Optional[int]] = lambda: None,
                 running: Callable[[], bool] = lambda: True,
                 watch_root: Optional[Callable[[Callable[[Any], None]], Any]] = None):
        self.kernel = kernel
        self._live, self._freeze, self._frozen = live, freeze, frozen
        self._write_u64, self._hz, self._running = write_u64, hz, running
        self._watch_root = watch_root
        self._layout: Optional[ScxLayout] = None
        self.hz_override: Optional[int] = None
        self.last_exit: Optional[ScxState] = None  # the last state seen with an exit kind

    @property
    def layout(self) -> ScxLayout:
        """The kernel's sched_ext layout (KernelFeatureMissing when unsupported)."""
        if self._layout is None:
            self._layout = ScxLayout.of(self.kernel)
        return self._layout

    def state(self, freeze: bool = False) -> ScxState:
        """sched_ext's state now. ``freeze=True`` parks the guest for the read; inside
        ``with m.freeze():`` the read is one instant anyway; else re-checked reads."""
        lay = self.layout
        if freeze:
            with self._freeze():
                s = read_state(self._live(), lay, frozen=True)
        else:
            s = read_state(self._live(), lay, frozen=self._frozen())
        if s.exit_kind is not None:
            self.last_exit = s
        return s

    def wait_for_exit(self, timeout: float, interval: float = 0.005,
                      settle: float = 0.5) -> ScxState:
        """Wait until the scheduler has exited and return its state (also kept in
        ``last_exit``). Where data watchpoints hit (VMX/SVM), a write watchpoint on
        ``scx_root`` catches the detach and reads the exit there, whole, however short
        the scheduler's life (vmm/kernel/scx_exit_watch.py). Besides, state() is polled
        (unfrozen, every ``interval`` s): an exit kind claimed (then up to ``settle`` s
        more for the kernel to write the reason and message), or the state leaving
        enabled/enabling after having been there. A state that left without any exit
        seen (the whole exit fell between two polls, nothing caught) is returned as it
        is, exit_kind None. ScxTimeout when ``timeout`` passes; VmmError when the VM
        ends first."""
        catcher = self._catch_exits()
        try:
            return self._wait_for_exit(catcher, timeout, interval, settle)
        finally:
            if catcher is not None:
                catcher.close()

    def _catch_exits(self):
        if self._watch_root is None:
            return None
        from vmm.kernel.scx_exit_watch import ExitCatcher

        lay = self.layout
        return ExitCatcher(lambda live, sch: _read_once(live, lay, root=sch)[0], self._watch_root)

    @staticmethod
    def _pause(catcher, seconds: float) -> None:
        """Between polls: ``seconds``, cut short when the watch catches an exit."""
        if catcher is None:
            time.sleep(seconds)
        else:
            catcher.event.wait(seconds)

    def _caught(self, catcher, wait: float = 0.0) -> Optional[ScxState]:
        if catcher is None:
            return None
        if wait > 0:
            catcher.event.wait(wait)
        s = catcher.take()
        if s is not None:
            self.last_exit = s
        return s

    def _wait_for_exit(self, catcher, timeout: float, interval: float, settle: float) -> ScxState:
        deadline = time.monotonic() + timeout
        was_enabled = False
        while True:
            caught = self._caught(catcher)
            if caught is not None:
                return caught
            if not self._running():
                raise VmmError("the VM is not running: no sched_ext exit to wait for")
            s = self.state()
            if s.exit_kind is not None:
                end = min(deadline, time.monotonic() + settle)
                while s.exit_reason is None and s.sched is not None and time.monotonic() < end:
                    self._pause(catcher, interval)
                    caught = self._caught(catcher)
                    if caught is not None:
                        return caught
                    nxt = self.state()
                    if nxt.exit_kind is None:  # scx_root cleared: keep what we had
                        break
                    s = nxt
                return self._caught(catcher, settle if s.exit_reason is None else 0) or s
            if s.state in ("enabling", "enabled") or s.sched is not None:
                was_enabled = True
            elif was_enabled:
                return self._caught(catcher, settle) or s
            if time.monotonic() >= deadline:
                raise ScxTimeout(f"no sched_ext exit within {timeout} s: {s.describe()}")
            self._pause(catcher, interval)

    # --- the watchdog ---------------------------------------------------------------
    @property
    def hz(self) -> int:
        """The kernel's CONFIG_HZ (jiffies per second): ``hz_override`` if set, else the
        kernel config's; KernelFeatureMissing when neither says."""
        if self.hz_override:
            return self.hz_override
        hz = self._hz()
        if not hz:
            raise KernelFeatureMissing("CONFIG_HZ unknown (no kernel config found): set "
                                       "m.scx.hz_override = N")
        return hz

    def _watchdog_kva(self, live) -> Optional[int]:
        lay = self.layout
        if lay.watchdog_off is not None:
            root = _u64(live.read_kva(live.symbol_address("scx_root"), 8))
            return root + lay.watchdog_off if root else None
        if lay.watchdog_global is not None:
            return live.symbol_address(lay.watchdog_global)
        raise KernelFeatureMissing("this kernel has neither scx_sched.watchdog_timeout nor "
                                   "scx_watchdog_timeout")

    @property
    def watchdog_timeout_jiffies(self) -> Optional[int]:
        """The watchdog timeout in jiffies: the attached scheduler's
        ``scx_root->watchdog_timeout`` (7.x; None when no scheduler is attached), or the
        global ``scx_watchdog_timeout`` on kernels that have it. Read under a freeze."""
        with self._freeze():
            live = self._live()
            kva = self._watchdog_kva(live)
            return None if kva is None else _u64(live.read_kva(kva, 8))

    @property
    def watchdog_timeout(self) -> Optional[float]:
        """The sched_ext watchdog timeout in SECONDS (jiffies / CONFIG_HZ); None when no
        scheduler is attached on a 7.x kernel (the timeout is the scheduler's). Setting it
        (seconds) writes the kernel field in one checked cold write (vmm/ops): e.g. 600
        before a long host-side freeze, so the kernel does not eject the scheduler for a
        stall the host caused. The kernel keeps its watchdog interval (half the timeout
        at enable time), so a longer timeout is honoured, checked as often as before."""
        j = self.watchdog_timeout_jiffies
        return None if j is None else j / self.hz

    @watchdog_timeout.setter
    def watchdog_timeout(self, seconds: float) -> None:
        self.set_watchdog_timeout_jiffies(max(1, round(seconds * self.hz)))

    def set_watchdog_timeout_jiffies(self, jiffies: int) -> None:
        """Write the watchdog timeout in jiffies (cold: scx_root is read and the field
        written inside one freeze)."""
        if self._write_u64 is None:
            raise VmmError("this view cannot write guest memory")
        if not 0 < jiffies < 1 << 63:
            raise VmmError(f"watchdog timeout {jiffies} jiffies is out of range")
        with self._freeze():
            kva = self._watchdog_kva(self._live())
            if kva is None:
                raise VmmError("no sched_ext scheduler is attached: its watchdog timeout "
                               "(scx_root->watchdog_timeout) does not exist yet")
            self._write_u64(kva, jiffies)
