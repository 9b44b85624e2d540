"""KernelTarget: where a kernel-memory op reads or writes, and how it resolves.

A target names a place the way a kernel developer does: a symbol (``jiffies``), a field
of a symbol (``init_uts_ns`` + ``name.nodename``), a per-CPU field (``runqueues``, CPU 3,
``scx.flags``), or a raw kernel virtual / guest-physical address. Resolution turns it
into a :class:`Location` (guest-physical address, size, description) through the
kernel's symbols and BTF and the live guest's page tables; nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

from ..errors import TargetError, VmmError


@dataclass(frozen=True)
class Location:
    """A resolved target: ``size`` bytes of guest RAM at guest-physical ``gpa``.

    ``size`` is None when nothing says how wide the object is (a raw address);
    then the value's own width is used. ``bit_size`` is set for bitfield members,
    which whole-byte ops refuse.
    """

    gpa: int
    size: Optional[int]
    description: str
    kva: Optional[int] = None
    type_name: Optional[str] = None
    bit_size: Optional[int] = None


class Resolver(Protocol):
    """What resolution needs from the live kernel view (vmm.kernel's attach())."""

    def locate_symbol(self, name: str, path: Optional[str], cpu: Optional[int],
                      type: Optional[str] = None) -> Location: ...

    def locate_kva(self, kva: int, size: Optional[int]) -> Location: ...

    def locate_gpa(self, gpa: int, size: Optional[int]) -> Location: ...


class KernelTarget:
    """Base of the target variants; build them with the constructors below."""

    __slots__ = ()

    def resolve(self, resolver: Resolver) -> Location:
        raise NotImplementedError

    @staticmethod
    def symbol(name: str, size: Optional[int] = None, type: Optional[str] = None) -> "SymbolTarget":
        """The whole object a symbol names (``jiffies``)."""
        return SymbolTarget(name, size, type)

    @staticmethod
    def field(name: str, path: str, type: Optional[str] = None) -> "FieldTarget":
        """A BTF field of a global: ``KernelTarget.field("init_uts_ns", "name.nodename")``.

        BTF describes the types of per-CPU variables only (pahole's default), so for
        other globals the type is looked up by name or given: ``type="struct foo"``."""
        return FieldTarget(name, path, type)

    @staticmethod
    def per_cpu(name: str, cpu: int, path: Optional[str] = None,
                type: Optional[str] = None) -> "PerCpu":
        """CPU ``cpu``'s copy of a per-CPU variable, or a field in it (``scx.flags``)."""
        return PerCpu(name, cpu, path, type)

    @staticmethod
    def kva(address: int, size: Optional[int] = None) -> "Kva":
        """A kernel virtual address, translated through the guest's page tables."""
        return Kva(address, size)

    @staticmethod
    def gpa(address: int, size: Optional[int] = None) -> "Gpa":
        """A guest-physical address."""
        return Gpa(address, size)

    @staticmethod
    def from_drgn(obj: Any) -> "Typed":
        """A drgn object in kernel memory (``cpu_rq(prog, 1).scx.flags``): its address
        and type, checked against the kernel's BTF (same name, same size) when resolved."""
        return Typed.from_drgn(obj)


def _check_size(size: Optional[int]) -> None:
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise TargetError(f"size must be a positive int, not {size!r}")


@dataclass(frozen=True)
class SymbolTarget(KernelTarget):
    """The whole object a symbol names; `size` overrides the symbol table's (KernelTarget.symbol)."""

    name: str
    size: Optional[int] = None
    type: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name:
            raise TargetError("symbol name is empty")
        _check_size(self.size)

    def resolve(self, resolver: Resolver) -> Location:
        loc = resolver.locate_symbol(self.name, None, None, self.type)
        if self.size is not None:
            loc = Location(loc.gpa, self.size, loc.description, loc.kva, loc.type_name)
        return loc

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FieldTarget(KernelTarget):
    """A field of a global, by BTF field path (KernelTarget.field)."""

    name: str
    path: str
    type: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            raise TargetError("a field target needs a symbol and a field path")

    def resolve(self, resolver: Resolver) -> Location:
        return resolver.locate_symbol(self.name, self.path, None, self.type)

    def __str__(self) -> str:
        return f"{self.name}.{self.path}"


@dataclass(frozen=True)
class PerCpu(KernelTarget):
    """CPU `cpu`'s copy of a per-CPU variable, or a field path in it (KernelTarget.per_cpu)."""

    name: str
    cpu: int
    path: Optional[str] = None
    type: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name:
            raise TargetError("per-CPU target needs a symbol name")
        if isinstance(self.cpu, bool) or not isinstance(self.cpu, int) or self.cpu < 0:
            raise TargetError(f"cpu must be a non-negative int, not {self.cpu!r}")

    def resolve(self, resolver: Resolver) -> Location:
        return resolver.locate_symbol(self.name, self.path, self.cpu, self.type)

    def __str__(self) -> str:
        return f"per_cpu({self.name}, {self.cpu})" + (f".{self.path}" if self.path else "")


def _check_address(kind: str, address) -> None:
    """Addresses are unsigned 64-bit: anything else would wrap silently when masked."""
    if isinstance(address, bool) or not isinstance(address, int):
        raise TargetError(f"{kind} address must be an int, not {type(address).__name__} "
                          f"{address!r:.40}")
    if not 0 <= address < 1 << 64:
        raise TargetError(f"{kind} address {address:#x} is outside [0, 2**64): a 64-bit "
                          "address cannot be negative or wider than 64 bits")


@dataclass(frozen=True)
class Kva(KernelTarget):
    """A kernel virtual address, translated through the guest's page tables (KernelTarget.kva)."""

    address: int
    size: Optional[int] = None

    def __post_init__(self) -> None:
        _check_address("kva", self.address)
        _check_size(self.size)

    def resolve(self, resolver: Resolver) -> Location:
        return resolver.locate_kva(self.address, self.size)

    def __str__(self) -> str:
        return f"kva {self.address:#x}"


@dataclass(frozen=True)
class Gpa(KernelTarget):
    """A guest-physical address (KernelTarget.gpa)."""

    address: int
    size: Optional[int] = None

    def __post_init__(self) -> None:
        _check_address("gpa", self.address)
        _check_size(self.size)

    def resolve(self, resolver: Resolver) -> Location:
        return resolver.locate_gpa(self.address, self.size)

    def __str__(self) -> str:
        return f"gpa {self.address:#x}"


@dataclass(frozen=True)
class Typed(KernelTarget):
    """A kernel virtual address holding an object of a named C type (from a debugger
    such as drgn), checked against BTF: the type must exist there with the same size."""

    address: int
    type_name: str
    size: int
    what: str = ""
    pointer: bool = False  # a pointer type: BTF has no name for it, only its size is checked

    def __post_init__(self) -> None:
        _check_size(self.size)

    @staticmethod
    def from_drgn(obj: Any) -> "Typed":
        """The target of a drgn object: its address and type, checked against BTF when resolved."""
        # Duck-typed (drgn.Object: address_, type_, bit_field_size_): vmm.ops does not
        # import drgn.
        try:
            address, type_ = obj.address_, obj.type_
        except AttributeError:
            raise TargetError(f"{obj!r} is not a drgn.Object") from None
        name = type_.type_name()
        if address is None:
            raise TargetError(f"drgn object of type {name} is a value, not an object in "
                              f"kernel memory: nothing to write to")
        if getattr(obj, "bit_field_size_", None):
            raise TargetError(f"drgn object at {address:#x} is a {obj.bit_field_size_}-bit "
                              f"bit field of {name}: whole-byte writes cannot target it")
        import drgn  # present: obj is a drgn.Object

        size = drgn.sizeof(type_)
        kind = drgn.TypeKind
        t = type_
        while t.kind == kind.TYPEDEF and t.name is None:
            t = t.type
        return Typed(address, name, size, f"drgn {name} at {address:#x}",
                     pointer=t.kind == kind.POINTER)

    def resolve(self, resolver: Resolver) -> Location:
        btf = getattr(resolver, "btf", None)
        if btf is None:
            raise TargetError(f"{self}: checking a typed target needs the kernel's BTF")
        if self.pointer:
            if self.size != 8:
                raise TargetError(f"{self}: a pointer of {self.size} bytes on x86-64")
        else:
            try:
                t = btf.type(self.type_name)
            except VmmError as exc:
                raise TargetError(f"{self}: type {self.type_name!r} is not in the kernel's "
                                  f"BTF ({exc}): is this drgn Program the same kernel?") from exc
            if btf.sizeof(t) != self.size:
                raise TargetError(f"{self}: {self.type_name} is {self.size} bytes to the "
                                  f"debugger but {btf.sizeof(t)} bytes in the kernel's BTF")
        loc = resolver.locate_kva(self.address, self.size)
        return Location(loc.gpa, self.size,
                        f"{self.what or self} ({self.type_name}, {self.size} bytes at kva "
                        f"{self.address:#x})", kva=self.address, type_name=self.type_name)

    def __str__(self) -> str:
        return f"({self.type_name}) kva {self.address:#x}"


# The target classes are named ...Target so that they do not read as vmm.kernel's Symbol
# (a symbol table entry) and Field (a BTF member); the old names stay as aliases.
Symbol = SymbolTarget
Field = FieldTarget
KernelTarget.Symbol = SymbolTarget  # type: ignore[attr-defined]
KernelTarget.Field = FieldTarget  # type: ignore[attr-defined]
KernelTarget.PerCpu = PerCpu  # type: ignore[attr-defined]
KernelTarget.Kva = Kva  # type: ignore[attr-defined]
KernelTarget.Gpa = Gpa  # type: ignore[attr-defined]
KernelTarget.Typed = Typed  # type: ignore[attr-defined]


def as_target_error(target: KernelTarget, exc: VmmError) -> TargetError:
    """Wrap a resolution failure so the message names the target."""
    if isinstance(exc, TargetError):
        return exc
    err = TargetError(f"{target}: {exc}")
    err.__cause__ = exc
    return err
