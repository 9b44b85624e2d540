"""BTF's data model: kinds, the decoded Type and its parts, the Field a member path
resolves to, and the cycle guard every walk over types uses (see btf.py for the parser).

Documentation/bpf/btf.rst names the kinds and their records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from vmm.errors import ImageError

# Kinds (btf.rst "BTF_KIND_*").
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19

KIND_NAMES = {
    0: "void", INT: "int", PTR: "ptr", ARRAY: "array", STRUCT: "struct", UNION: "union",
    ENUM: "enum", FWD: "fwd", TYPEDEF: "typedef", VOLATILE: "volatile", CONST: "const",
    RESTRICT: "restrict", FUNC: "func", FUNC_PROTO: "func_proto", VAR: "var",
    DATASEC: "datasec", FLOAT: "float", DECL_TAG: "decl_tag", TYPE_TAG: "type_tag",
    ENUM64: "enum64",
}
# Kinds that only qualify another type: skipped when resolving to the "real" type.
MODIFIERS = frozenset({TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG})

INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4
POINTER_SIZE = 8  # x86-64 only
MAX_CHAIN = 64  # modifier/array nesting deeper than this is a cycle in corrupt BTF
NAME_BUDGET = 512  # types one type_name() may visit before it abbreviates with "..."


def _enter(stack: list[int], t, doing: str) -> None:
    """Pushes t.id on a walk's stack; ImageError naming it when it is already there (the
    type refers back to itself) or the walk is deeper than MAX_CHAIN."""
    if t.id in stack:
        path = " -> ".join(str(i) for i in stack[stack.index(t.id):] + [t.id])
        raise ImageError(f"BTF type {t.id} ({t.kind_name} {t.name or '(anonymous)'}) refers "
                         f"back to itself while {doing} (types {path}): a cycle, corrupt BTF")
    if len(stack) >= MAX_CHAIN:
        raise ImageError(f"BTF type {t.id}: nested more than {MAX_CHAIN} deep while {doing} "
                         "(corrupt BTF?)")
    stack.append(t.id)


class Member(NamedTuple):
    """A struct/union member: name ('' when anonymous), type id, bit offset, bitfield width."""

    name: str
    type_id: int
    bit_offset: int  # from the start of the enclosing struct/union
    bitfield_size: int  # 0 when not a bitfield


class EnumValue(NamedTuple):
    """One enumerator: name and value."""

    name: str
    value: int


class Param(NamedTuple):
    """One function-prototype parameter: name and type id (0: varargs)."""

    name: str
    type_id: int


class VarSecinfo(NamedTuple):
    """A DATASEC entry: the VAR's type id, its offset in the section and its size."""

    type_id: int
    offset: int
    size: int


@dataclass
class Type:
    """One decoded BTF type. Fields not meaningful for a kind keep their default."""

    id: int
    kind: int
    name: str
    kind_flag: bool = False
    size: int = 0  # INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC
    ref: int = 0  # PTR, TYPEDEF, modifiers, FUNC, FUNC_PROTO (return), VAR, DECL_TAG
    vlen: int = 0
    members: list[Member] = field(default_factory=list)
    enum_values: list[EnumValue] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    secinfo: list[VarSecinfo] = field(default_factory=list)
    # INT encoding
    int_encoding: int = 0
    int_offset: int = 0
    int_bits: int = 0
    # ARRAY
    elem_type: int = 0
    index_type: int = 0
    nelems: int = 0
    # VAR linkage, DECL_TAG component index
    linkage: int = 0
    component_idx: int = -1

    def __repr__(self) -> str:
        return f"<Type {self.id} {self.kind_name} {self.name or '(anon)'}>"

    @property
    def kind_name(self) -> str:
        """'struct', 'int', 'ptr' ... (kindN for an unknown kind)."""
        return KIND_NAMES.get(self.kind, f"kind{self.kind}")

    @property
    def signed(self) -> bool:
        """True for a signed INT or a signed enum."""
        if self.kind == INT:
            return bool(self.int_encoding & INT_SIGNED)
        if self.kind in (ENUM, ENUM64):
            return self.kind_flag
        return False


VOID = Type(id=0, kind=0, name="void")


class Field(NamedTuple):
    """Where a member path lies inside a type.

    For a bitfield, `offset`/`size` give the storage unit (the member's declared type,
    aligned like pahole prints it) and `bit_offset`/`bit_size` the bits inside it
    counted from its least significant bit. For other members bit_offset = bit_size = 0.
    """

    offset: int
    size: int
    type: Type
    bit_offset: int = 0
    bit_size: int = 0
