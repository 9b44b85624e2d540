"""Op batches and their dispatcher: the seed's WriteKernelCold/Hot and ReadKernelCold/Hot.

Rules (../shared/seed, followed to the letter):

- One cold batch is one freeze rendezvous: every vCPU is parked on a futex for the whole
  batch, so a cold ``OrU32`` (read, OR, write) is atomic by quiesce and the batch's
  writes are observed by the guest as one step (write ``scx.clock`` *then* OR
  ``SCX_RQ_CLK_VALID`` into ``scx.flags`` gives the kernel's own ordering).
- Hot batches run against the live guest with no freeze; a release fence follows the
  batch; hot ``OrU32`` is an atomic fetch-or and a misaligned hot ``OrU32`` is refused.
- ``U32``/``U64`` are single stores at aligned host addresses, per-byte otherwise;
  ``Bytes`` is a copy followed by a release fence.
- Order inside a batch is preserved.
- Better than the reference harness: every entry is resolved and validated before the
  first write. A bad entry fails the whole batch with :class:`BatchError` naming its
  index, and guest memory is left untouched.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

from ..errors import BatchError, GuestMemoryError, TargetError, VmmError
from .targets import KernelTarget, Location, Resolver
from .values import Bytes, KernelValue, OrU32, U32, U64, value_from_bytes

COLD, HOT = "cold", "hot"


@dataclass(frozen=True)
class Op:
    """A batch of kernel-memory operations; build with the four constructors."""

    action: str  # "write" or "read"
    path: str  # COLD or HOT
    entries: tuple

    @staticmethod
    def WriteKernelCold(batch: Iterable[tuple[KernelTarget, KernelValue]]) -> "Op":
        """Writes applied while every vCPU is parked (one rendezvous for the batch)."""
        return Op("write", COLD, _write_entries(batch))

    @staticmethod
    def WriteKernelHot(batch: Iterable[tuple[KernelTarget, KernelValue]]) -> "Op":
        """Writes into the running guest: no freeze, release fence after the batch."""
        return Op("write", HOT, _write_entries(batch))

    @staticmethod
    def ReadKernelCold(batch: Iterable[KernelTarget]) -> "Op":
        """Reads taken while every vCPU is parked: a consistent snapshot."""
        return Op("read", COLD, _read_entries(batch))

    @staticmethod
    def ReadKernelHot(batch: Iterable[KernelTarget]) -> "Op":
        """Reads of the running guest (each aligned u32/u64 read is one load)."""
        return Op("read", HOT, _read_entries(batch))

    def __len__(self) -> int:
        return len(self.entries)


def _write_entries(batch: Iterable[Any]) -> tuple:
    entries = []
    for i, entry in enumerate(batch):
        try:
            target, value = entry
        except (TypeError, ValueError):
            raise BatchError(i, TargetError(f"expected (KernelTarget, KernelValue), got {entry!r}")) from None
        if not isinstance(target, KernelTarget):
            raise BatchError(i, TargetError(f"{target!r} is not a KernelTarget"))
        if not isinstance(value, KernelValue):
            raise BatchError(i, TargetError(f"{value!r} is not a KernelValue"))
        entries.append((target, value))
    return tuple(entries)


def _read_entries(batch: Iterable[Any]) -> tuple:
    entries = []
    for i, target in enumerate(batch):
        if not isinstance(target, KernelTarget):
            raise BatchError(i, TargetError(f"{target!r} is not a KernelTarget"))
        entries.append(target)
    return tuple(entries)


@dataclass
class EntryResult:
    """What one entry did: where it resolved, the value before and after."""

    target: KernelTarget
    location: Location
    value: Optional[KernelValue]  # what was written (None for reads)
    before: Optional[KernelValue] = None  # value found there before a write
    after: Optional[KernelValue] = None  # value there afterwards / the value read


@dataclass
class OpResult:
    op: Op
    entries: list[EntryResult] = field(default_factory=list)
    apply_seconds: float = 0.0  # resolve+validate+apply time inside the rendezvous

    @property
    def values(self) -> list[KernelValue]:
        """For reads: the values in batch order."""
        return [e.after for e in self.entries]  # type: ignore[misc]


def _check_write(index: int, target: KernelTarget, value: KernelValue, loc: Location,
                 memory: Any, path: str) -> None:
    """Everything that must hold before a single byte of the batch is written."""
    if loc.bit_size is not None:
        raise TargetError(f"{loc.description} is a {loc.bit_size}-bit bitfield; "
                          "byte-granular writes would clobber its neighbours")
    width = value.width
    if loc.size is not None:
        if isinstance(value, Bytes):
            if width > loc.size:
                raise TargetError(f"Bytes payload of {width} bytes does not fit "
                                  f"{loc.description} ({loc.size} bytes)")
        elif width != loc.size:
            raise TargetError(f"{type(value).__name__} is {width} bytes but "
                              f"{loc.description} is {loc.size} bytes"
                              + (f" ({loc.type_name})" if loc.type_name else ""))
    try:
        host = memory.host_address(loc.gpa, width)
    except GuestMemoryError as exc:
        raise TargetError(f"{loc.description}: {exc}") from exc
    if path == HOT and isinstance(value, OrU32) and host % 4:
        raise TargetError(f"misaligned hot-path OrU32 target {loc.description} at host "
                          f"address {host:#x}: an atomic OR needs 4-byte alignment "
                          "(use WriteKernelCold, which is atomic by quiesce)")


def _store(memory: Any, loc: Location, value: KernelValue, path: str) -> tuple[KernelValue, KernelValue]:
    """Apply one validated write; return (before, after)."""
    gpa = loc.gpa
    if isinstance(value, U32):
        before = U32(memory.read_u32(gpa))
        memory.write_u32(gpa, value.value)
        return before, value
    if isinstance(value, U64):
        before = U64(memory.read_u64(gpa))
        memory.write_u64(gpa, value.value)
        return before, value
    if isinstance(value, OrU32):
        if path == HOT:
            old = memory.fetch_or_u32(gpa, value.mask)
        else:
            # Atomic by quiesce: every vCPU is parked, we are the only writer.
            old = memory.read_u32(gpa)
            memory.write_u32(gpa, old | value.mask)
        return U32(old), U32(old | value.mask)
    if isinstance(value, Bytes):
        before = Bytes(memory.read(gpa, value.width))
        memory.write(gpa, value.data)
        memory.release_fence()
        return before, value
    raise TargetError(f"unsupported value variant {type(value).__name__}")


def _read(memory: Any, loc: Location) -> KernelValue:
    if loc.size == 4:
        return U32(memory.read_u32(loc.gpa))
    if loc.size == 8:
        return U64(memory.read_u64(loc.gpa))
    return value_from_bytes(memory.read(loc.gpa, loc.size))


def resolve_all(entries: Sequence[Any], resolver: Resolver, action: str) -> list[Location]:
    """Resolve every target, naming the failing index; nothing is written."""
    locations = []
    for i, entry in enumerate(entries):
        target = entry[0] if action == "write" else entry
        try:
            loc = target.resolve(resolver)
            if action == "read" and loc.size is None:
                raise TargetError(f"{target}: its size is unknown; give size= to the target")
        except VmmError as exc:
            raise BatchError(i, exc) from exc
        locations.append(loc)
    return locations


def apply_op(op: Op, memory: Any, resolver_factory: Callable[[Any], Resolver],
             freeze: Callable[[], ContextManager[Any]]) -> OpResult:
    """Run ``op`` against guest ``memory``.

    ``freeze()`` returns a context manager holding the rendezvous and yielding the
    freeze snapshot; ``resolver_factory(snapshot_or_None)`` builds the resolver (a cold
    op resolves with the registers captured at the freeze, e.g. CR3 for page walks).
    """
    result = OpResult(op)
    hold = freeze() if op.path == COLD else nullcontext(None)
    with hold as snapshot:
        started = time.perf_counter()
        resolver = resolver_factory(snapshot)
        locations = resolve_all(op.entries, resolver, op.action)
        if op.action == "read":
            for target, loc in zip(op.entries, locations):
                result.entries.append(EntryResult(target, loc, None, after=_read(memory, loc)))
        else:
            for i, ((target, value), loc) in enumerate(zip(op.entries, locations)):
                try:
                    _check_write(i, target, value, loc, memory, op.path)
                except VmmError as exc:
                    raise BatchError(i, exc) from exc
            for (target, value), loc in zip(op.entries, locations):
                before, after = _store(memory, loc, value, op.path)
                result.entries.append(EntryResult(target, loc, value, before, after))
            if op.path == HOT:
                memory.release_fence()
        if op.path == COLD:
            result.apply_seconds = time.perf_counter() - started
    return result
