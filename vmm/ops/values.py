"""KernelValue: the value payload of the kernel-memory write ops and the result of reads.

The contract is docs/CONTRACTS.md, "vmm/ops" (the project's seed ``KernelValue``). The
variant picks both the width and the store primitive:

- ``U32(v)``  32-bit little-endian store: one instruction at a 4-byte aligned host
  address (atomic), a per-byte volatile loop otherwise (torn state observable to a
  concurrent reader).
- ``U64(v)``  the same at 8 bytes.
- ``Bytes(b)`` a plain copy followed by a release fence: ordered, not atomic.
- ``OrU32(mask)`` read-modify-write OR of a u32. Cold path: read, OR, write while
  every vCPU is parked (atomic by quiesce). Hot path: an atomic fetch-or at 4-byte
  alignment; misaligned targets are rejected (a per-byte fallback cannot be atomic
  against a live kernel writer). There is deliberately no ``OrU64``: the canonical
  target, ``struct scx_rq.flags``, is a u32 whose neighbour ``nr_immed`` a 64-bit RMW
  would corrupt.

Like the Rust enum (``#[non_exhaustive]``), new widths may be added: match on
``value.kind`` or ``isinstance``, and build values with the constructors
``KernelValue.u32(v)``, ``.u64(v)``, ``.bytes(b)``, ``.or_u32(mask)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vmm.arch.x86.regs import MASK32 as _U32_MAX, MASK64 as _U64_MAX
from vmm.errors import InvalidValue, InvalidValueType


class KernelValue:
    """Base of the value variants; see the module docstring for the contract."""

    __slots__ = ()
    kind: ClassVar[str]

    @property
    def width(self) -> int:
        """Bytes the value occupies in guest memory."""
        raise NotImplementedError

    @property
    def is_rmw(self) -> bool:
        """True for read-modify-write variants (they read the live value first)."""
        return False

    def encode(self) -> bytes:
        """Little-endian bytes a plain store of this value writes (not for RMW)."""
        raise NotImplementedError

    # Per-variant constructors, as the seed asks ("prefer them over variant literals").
    @staticmethod
    def u32(value: int) -> "U32":
        """A U32 store of v."""
        return U32(value)

    @staticmethod
    def u64(value: int) -> "U64":
        """A U64 store of v."""
        return U64(value)

    @staticmethod
    def or_u32(mask: int) -> "OrU32":
        """32-bit read-modify-write OR mask, e.g. SCX_RQ_CLK_VALID into scx_rq.flags."""
        return OrU32(mask)

    @staticmethod
    def bytes(data: "bytes | bytearray | memoryview") -> "Bytes":  # noqa: A003
        """A Bytes copy of b."""
        return Bytes(data)

    @staticmethod
    def bytes_(data: "bytes | bytearray | memoryview") -> "Bytes":
        """The same as bytes() (the spelling docs/CONTRACTS.md uses)."""
        return Bytes(data)


def _check_int(name: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueType(f"{name} takes an int, not {type(value).__name__} {value!r:.40}")
    if not 0 <= value <= maximum:
        raise InvalidValue(f"{name} value {value:#x} is outside [0, {maximum:#x}]: it does not "
                           f"fit in {maximum.bit_length()} unsigned bits")


@dataclass(frozen=True, slots=True)
class U32(KernelValue):
    """A 32-bit store (one aligned store instruction)."""

    value: int
    kind: ClassVar[str] = "u32"

    def __post_init__(self) -> None:
        _check_int("U32", self.value, _U32_MAX)

    @property
    def width(self) -> int:
        """4 bytes."""
        return 4

    def encode(self) -> bytes:
        """The value as 4 little-endian bytes."""
        return self.value.to_bytes(4, "little")

    def __repr__(self) -> str:
        return f"U32({self.value:#x})"


@dataclass(frozen=True, slots=True)
class U64(KernelValue):
    """A 64-bit store (one aligned store instruction)."""

    value: int
    kind: ClassVar[str] = "u64"

    def __post_init__(self) -> None:
        _check_int("U64", self.value, _U64_MAX)

    @property
    def width(self) -> int:
        """8 bytes."""
        return 8

    def encode(self) -> bytes:
        """The value as 8 little-endian bytes."""
        return self.value.to_bytes(8, "little")

    def __repr__(self) -> str:
        return f"U64({self.value:#x})"


@dataclass(frozen=True, slots=True)
class Bytes(KernelValue):
    """A byte copy followed by a release fence."""

    data: bytes
    kind: ClassVar[str] = "bytes"

    def __post_init__(self) -> None:
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise InvalidValueType(f"Bytes takes bytes, not {type(self.data).__name__}")
        object.__setattr__(self, "data", bytes(self.data))
        if not self.data:
            raise InvalidValue("Bytes payload is empty: give at least one byte")

    @property
    def width(self) -> int:
        """The payload's length."""
        return len(self.data)

    def encode(self) -> bytes:
        """The payload."""
        return self.data

    def __repr__(self) -> str:
        shown = self.data[:32]
        more = f"...+{len(self.data) - 32}" if len(self.data) > 32 else ""
        return f"Bytes({shown!r}{more})"


@dataclass(frozen=True, slots=True)
class OrU32(KernelValue):
    """OR a 32-bit mask in: read-OR-write while frozen (cold), an atomic OR when hot."""

    mask: int
    kind: ClassVar[str] = "or_u32"

    def __post_init__(self) -> None:
        _check_int("OrU32", self.mask, _U32_MAX)

    @property
    def width(self) -> int:
        """4 bytes."""
        return 4

    @property
    def is_rmw(self) -> bool:
        """True: a read-modify-write."""
        return True

    def encode(self) -> bytes:
        """The mask as 4 little-endian bytes."""
        raise InvalidValueType("OrU32 is a read-modify-write: it has no fixed bytes to store")

    def __repr__(self) -> str:
        return f"OrU32({self.mask:#x})"


# Variant names usable as KernelValue.U32 etc., mirroring the Rust enum's paths.
KernelValue.U32 = U32  # type: ignore[attr-defined]
KernelValue.U64 = U64  # type: ignore[attr-defined]
KernelValue.Bytes = Bytes  # type: ignore[attr-defined]
KernelValue.OrU32 = OrU32  # type: ignore[attr-defined]


def value_from_bytes(raw: bytes) -> KernelValue:
    """The result shape of a read: U32 for 4 bytes, U64 for 8, Bytes otherwise."""
    if len(raw) == 4:
        return U32(int.from_bytes(raw, "little"))
    if len(raw) == 8:
        return U64(int.from_bytes(raw, "little"))
    return Bytes(raw)
