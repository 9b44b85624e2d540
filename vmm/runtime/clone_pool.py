"""Clones with their VM made ahead: a pool of empty machines for one snapshot.

A clone's restore (vmm.runtime.snapshot.restore) spends most of its time making KVM
objects: the VM, its irqchip and PIT, and the vCPUs with their CPUID (in the SVM lane
~40 of ~75 ms, the kernel work of KVM_CREATE_VM and KVM_CREATE_VCPU under emulation).
None of that depends on the snapshot's RAM or device state, so a `ClonePool` makes it
ahead, on a thread of its own, while the previous clone runs: `pool.clone()` takes a
ready shell (or makes one then, when none is ready), restores the snapshot into it and
starts the next shell's making. A test matrix that runs one clone after another pays
only the rest of the restore on its critical path.

    pool = ClonePool(vmm.Machine, snapshot, ready=1)
    with pool.clone() as m:   # a full machine, running
        ...
    pool.close()              # frees the shells not taken

The pool holds at most `ready` shells: each is a VM with its vCPUs' fds and kvm_run
pages, a few hundred KiB of host memory, and no guest RAM (that comes at restore).
"""

from __future__ import annotations

import threading

from vmm.runtime.snapshot import Snapshot, SnapshotError, make_shell, restore


class ClonePool:
    """Empty machines made ahead for clones of `snapshot` with `options` (the same
    overrides Machine.from_snapshot takes)."""

    def __init__(self, cls, snapshot: Snapshot, ready: int = 1, **options):
        if not isinstance(snapshot, Snapshot):
            raise SnapshotError("a ClonePool needs a Snapshot (Snapshot.load(path) for a "
                                "directory): it keeps the snapshot's memory open")
        if ready < 1:
            raise ValueError(f"ready={ready}: a pool keeps at least one machine ready")
        self.cls, self.snapshot, self.ready, self.options = cls, snapshot, ready, options
        self._shells: list = []
        self._lock = threading.Condition()
        self._making = 0  # shells being made on the filler thread
        self._closed = False
        self._error: BaseException | None = None  # the filler's last failure, raised once
        self.made_ahead = 0  # clones that found a shell ready (for figures)
        self.made_late = 0  # clones that had to make theirs
        self._fill()

    def clone(self, start: bool = True):
        """A machine going on from the snapshot (vmm.runtime.snapshot.restore), in a
        shell made ahead when one is ready; then the next shell is started."""
        with self._lock:
            if self._closed:
                raise SnapshotError("the clone pool is closed")
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            shell = self._shells.pop(0) if self._shells else None
        if shell is None:
            self.made_late += 1
        else:
            self.made_ahead += 1
        try:
            return restore(self.cls, self.snapshot, start=start, shell=shell, **self.options)
        finally:
            self._fill()

    def _fill(self) -> None:
        with self._lock:
            wanted = self.ready - len(self._shells) - self._making
            if self._closed or wanted <= 0:
                return
            self._making += wanted
        threading.Thread(target=self._make, args=(wanted,), name="clone-pool", daemon=True).start()

    def _make(self, count: int) -> None:
        for _ in range(count):
            shell = None
            try:
                shell = make_shell(self.cls, self.snapshot, **self.options)
            except BaseException as e:  # said at the next clone(), which makes its own
                with self._lock:
                    self._error = e
            with self._lock:
                self._making -= 1
                if shell is not None and not self._closed:
                    self._shells.append(shell)
                    shell = None
                self._lock.notify_all()
            if shell is not None:  # made after close(): freed here
                shell._teardown()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits until `ready` shells are made (for figures that leave the making out)."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._shells) >= self.ready or self._closed
                                       or self._error is not None, timeout)

    def close(self) -> None:
        """Frees every shell not taken; a shell still being made is freed when done."""
        with self._lock:
            self._closed = True
            shells, self._shells = self._shells, []
        for shell in shells:
            shell._teardown()

    def __enter__(self) -> "ClonePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
