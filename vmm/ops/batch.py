"""Op batches and their dispatcher: the seed's WriteKernelCold/Hot and ReadKernelCold/Hot.

Rules (the seed contract as docs/CONTRACTS.md and README.md state it, followed to the letter):

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
- A cold batch keeps the guest frozen only for what must happen frozen: targets are
  staged (resolved, width-checked) before the freeze as far as the running guest allows
  (vmm/ops/resolve.py), the freeze re-checks staging's boot-time assumptions, finishes
  page-walked targets and applies the packed plan in one C call (vmm/ops/plan.py);
  results are built after the thaw.
"""

from __future__ import annotations

import enum
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

from ..errors import BatchError, GuestMemoryError, TargetError, VmmError
from .targets import KernelTarget, Location, Resolver
from .values import Bytes, KernelValue, OrU32, U32, U64, value_from_bytes

class Mode(enum.StrEnum):
    """How a batch meets the guest: COLD while every vCPU is parked, HOT while it runs.
    Equal to the strings "cold" and "hot" it replaced."""

    COLD = "cold"
    HOT = "hot"


COLD, HOT = Mode.COLD, Mode.HOT


@dataclass(frozen=True)
class Op:
    """A batch of kernel-memory operations; build with the four constructors."""

    action: str  # "write" or "read"
    mode: Mode  # COLD or HOT (was `path`, which read like a field path)
    entries: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))

    @property
    def path(self) -> Mode:
        """Deprecated name of `mode`."""
        warnings.warn("Op.path is deprecated: use Op.mode (COLD or HOT)", DeprecationWarning,
                      stacklevel=2)
        return self.mode

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
    """What a batch did: a result per entry and where the time went."""

    op: Op
    entries: list[EntryResult] = field(default_factory=list)
    apply_seconds: float = 0.0  # resolve+validate+apply time inside the rendezvous
    prepare_seconds: float = 0.0  # cold: staging (resolve + validate) before the freeze
    frozen_seconds: float = 0.0  # cold: freeze request -> thaw returned
    staged: bool = False  # cold: resolved before the freeze, the freeze only checked it
    restaged: bool = False  # cold: staging's assumptions failed the check: redone frozen

    @property
    def values(self) -> list[KernelValue]:
        """For reads: the values in batch order."""
        return [e.after for e in self.entries]  # type: ignore[misc]


def _check_value(value: KernelValue, loc: Location) -> None:
    """What the value and the resolved target's type say (no guest memory involved)."""
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


def _check_host(value: KernelValue, loc: Location, memory: Any, mode: Mode) -> int:
    """The target's guest-physical range is RAM (and aligned where it must be); its host
    address."""
    try:
        host = memory.host_address(loc.gpa, value.width)
    except GuestMemoryError as exc:
        raise TargetError(f"{loc.description}: {exc}") from exc
    if mode == HOT and isinstance(value, OrU32) and host % 4:
        raise TargetError(f"misaligned hot-path OrU32 target {loc.description} at host "
                          f"address {host:#x}: an atomic OR needs 4-byte alignment "
                          "(use WriteKernelCold, which is atomic by quiesce)")
    return host


def _check_write(index: int, target: KernelTarget, value: KernelValue, loc: Location,
                 memory: Any, mode: Mode) -> int:
    """Everything that must hold before a single byte of the batch is written."""
    _check_value(value, loc)
    return _check_host(value, loc, memory, mode)


def _check_read(loc: Location, memory: Any) -> int:
    try:
        return memory.host_address(loc.gpa, loc.size)
    except GuestMemoryError as exc:
        raise TargetError(f"{loc.description}: {exc}") from exc


def _store(memory: Any, loc: Location, value: KernelValue, mode: Mode) -> tuple[KernelValue, KernelValue]:
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
        if mode == HOT:
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
    if op.mode == COLD:
        return _apply_cold(op, memory, resolver_factory, freeze)
    result = OpResult(op)
    resolver = resolver_factory(None)
    locations = resolve_all(op.entries, resolver, op.action)
    if op.action == "read":
        for target, loc in zip(op.entries, locations):
            result.entries.append(EntryResult(target, loc, None, after=_read(memory, loc)))
        return result
    for i, ((target, value), loc) in enumerate(zip(op.entries, locations)):
        try:
            _check_write(i, target, value, loc, memory, op.mode)
        except VmmError as exc:
            raise BatchError(i, exc) from exc
    for (target, value), loc in zip(op.entries, locations):
        before, after = _store(memory, loc, value, op.mode)
        result.entries.append(EntryResult(target, loc, value, before, after))
    memory.release_fence()
    return result


# A cold entry's state between staging and the freeze.
_FULL = None  # resolve the whole target inside the freeze


def _stage(op: Op, resolver_factory: Callable[[Any], Resolver]) -> tuple[Any, list]:
    """Before the freeze: resolve and validate what cannot change while the guest runs.

    Returns (staged resolver or None, per entry a Location (``gpa`` None: page walk
    left to the freeze) or _FULL). A target that cannot be right whatever the guest
    does (unknown symbol, bad field path, a value of the wrong width) fails the batch
    here, before any vCPU is parked."""
    try:
        stager = getattr(resolver_factory(None), "staged", None)
        staged = stager() if stager is not None else None
    except VmmError:
        # E.g. no earlier freeze to give the KASLR slide: all of it inside the freeze.
        staged = None
    if staged is None:
        return None, [_FULL] * len(op.entries)
    from .resolve import Deferred

    locations: list = []
    for i, entry in enumerate(op.entries):
        target = entry[0] if op.action == "write" else entry
        try:
            loc = target.resolve(staged)
        except Deferred:
            locations.append(_FULL)
            continue
        except VmmError as exc:
            raise BatchError(i, exc) from exc
        try:
            if op.action == "read":
                if loc.size is None:
                    raise TargetError(f"{target}: its size is unknown; give size= to the target")
            else:
                _check_value(entry[1], loc)
        except VmmError as exc:
            raise BatchError(i, exc) from exc
        locations.append(loc)
    staged.seal()
    return staged, locations


def _apply_cold(op: Op, memory: Any, resolver_factory: Callable[[Any], Resolver],
                freeze: Callable[[], ContextManager[Any]]) -> OpResult:
    from .plan import Plan, native_available

    result = OpResult(op)
    t0 = time.perf_counter()
    staged, locations = _stage(op, resolver_factory)
    use_plan = native_available(memory)
    plan = Plan(memory, len(op.entries)) if use_plan else None
    writing = op.action == "write"
    pending = []  # indices the freeze must finish
    for i, loc in enumerate(locations):
        if loc is _FULL or loc.gpa is None:
            pending.append(i)
            continue
        try:
            if writing:
                host = _check_host(op.entries[i][1], loc, memory, COLD)
            else:
                host = _check_read(loc, memory)
        except VmmError as exc:
            raise BatchError(i, exc) from exc
        if plan is not None:
            if writing:
                plan.set_write(i, host, op.entries[i][1])
            else:
                plan.set_read(i, host, loc.size)
    result.prepare_seconds = time.perf_counter() - t0
    requested = time.perf_counter()
    with freeze() as snapshot:
        started = time.perf_counter()
        inner = resolver_factory(snapshot) if op.entries else None
        if staged is not None and not staged.still_valid(inner):
            # What staging assumed changed (see vmm.ops.resolve): start over, frozen.
            locations = [_FULL] * len(op.entries)
            pending = list(range(len(op.entries)))
            result.restaged = True
        for i in pending:
            entry = op.entries[i]
            target = entry[0] if writing else entry
            try:
                loc = locations[i]
                loc = target.resolve(inner) if loc is _FULL else inner.complete(loc)
                if writing:
                    _check_value(entry[1], loc)
                    host = _check_host(entry[1], loc, memory, COLD)
                else:
                    if loc.size is None:
                        raise TargetError(f"{target}: its size is unknown; give size= to the target")
                    host = _check_read(loc, memory)
            except VmmError as exc:
                raise BatchError(i, exc) from exc
            locations[i] = loc
            if plan is not None:
                if writing:
                    plan.set_write(i, host, entry[1])
                else:
                    plan.set_read(i, host, loc.size)
        if plan is not None:
            plan.run()
            outcome = None
        elif writing:
            outcome = [_store(memory, loc, value, COLD)
                       for (_, value), loc in zip(op.entries, locations)]
        else:
            outcome = [_read(memory, loc) for loc in locations]
        result.apply_seconds = time.perf_counter() - started
    result.frozen_seconds = time.perf_counter() - requested
    result.staged = staged is not None and not result.restaged
    # Results are built after the thaw: none of this needs the guest parked.
    if plan is not None:
        befores = plan.befores()
        if writing:
            for i, ((target, value), loc) in enumerate(zip(op.entries, locations)):
                before, after = plan.write_result(i, value, befores[i])
                result.entries.append(EntryResult(target, loc, value, before, after))
        else:
            for i, (target, loc) in enumerate(zip(op.entries, locations)):
                result.entries.append(EntryResult(target, loc, None,
                                                  after=plan.read_result(i, loc, befores[i])))
    elif writing:
        for ((target, value), loc), (before, after) in zip(zip(op.entries, locations), outcome):
            result.entries.append(EntryResult(target, loc, value, before, after))
    else:
        for target, loc, value in zip(op.entries, locations, outcome):
            result.entries.append(EntryResult(target, loc, None, after=value))
    return result
