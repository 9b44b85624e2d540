"""BTF (BPF Type Format) parser: the whole format of Documentation/bpf/btf.rst.

A vmlinux .BTF blob holds ~100k types. Decoding all of them in Python costs seconds,
so loading only *indexes* the type section (one pass recording where each type starts,
its kind and its name offset); a type is decoded the first time something asks for it.

Type ids: 0 is `void`; the first record in the type section is id 1.
"""

from __future__ import annotations

import re
import struct
from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

from vmm.errors import FieldPathError, ImageError, KernelFeatureMissing, TypeNotFound
from vmm.kernel.suggest import hint

BTF_MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off/len, str_off/len

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
# Bytes that follow the 12-byte common header: fixed part, then vlen * per-item size.
_FIXED_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_ITEM_SIZE = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}

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
    name: str
    type_id: int
    bit_offset: int  # from the start of the enclosing struct/union
    bitfield_size: int  # 0 when not a bitfield


class EnumValue(NamedTuple):
    name: str
    value: int


class Param(NamedTuple):
    name: str
    type_id: int


class VarSecinfo(NamedTuple):
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
        return KIND_NAMES.get(self.kind, f"kind{self.kind}")

    @property
    def signed(self) -> bool:
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


_PATH_TOKEN = re.compile(r"\s*(?:(\.)?\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(\d+|0x[0-9a-fA-F]+)\s*\]|(->))")


def parse_path(path: str) -> list[str | int]:
    """'scx.flags' -> ['scx', 'flags']; 'cpus[3].x' -> ['cpus', 3, 'x'].

    '->' is kept as a marker so the resolver can say the path crosses a pointer.
    """
    out: list[str | int] = []
    pos = 0
    path = path.strip()
    while pos < len(path):
        m = _PATH_TOKEN.match(path, pos)
        if not m or m.end() == pos:
            raise FieldPathError(f"bad field path {path!r} at character {pos}: {path[pos:]!r}")
        if m.group(2):
            if out and not m.group(1) and out[-1] != "->":
                raise FieldPathError(f"bad field path {path!r}: missing '.' before {m.group(2)!r}")
            out.append(m.group(2))
        elif m.group(3):
            out.append(int(m.group(3), 0))
        else:
            out.append("->")
        pos = m.end()
    if not out:
        raise FieldPathError("empty field path")
    return out


class Btf:
    """A parsed .BTF blob. Construct with Btf(data); raises ImageError when corrupt."""

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self._parse_header()
        self._index_types()
        self._cache: dict[int, Type] = {}
        self._enum_index: dict[int, tuple[int, int]] | None = None
        self._all_names: list[str] | None = None
        self._by_type_name: dict[str, Type] = {}  # type() answers: lookups repeat a lot

    # ---------------------------------------------------------------- loading
    def _parse_header(self) -> None:
        d = self.data
        if len(d) < HEADER.size:
            raise ImageError(f"BTF blob too short for its header ({len(d)} < {HEADER.size} bytes)")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = HEADER.unpack_from(d)
        if magic == 0x9FEB:
            raise ImageError("BTF is big-endian; only little-endian BTF is supported")
        if magic != BTF_MAGIC:
            raise ImageError(f"not BTF: magic {magic:#06x}, expected {BTF_MAGIC:#06x}")
        if version != 1:
            raise ImageError(f"unsupported BTF version {version} (only 1)")
        if hdr_len < HEADER.size or hdr_len > len(d):
            raise ImageError(f"BTF header length {hdr_len} invalid for a {len(d)}-byte blob")
        for what, off, ln in (("type", type_off, type_len), ("string", str_off, str_len)):
            if hdr_len + off + ln > len(d):
                raise ImageError(f"BTF {what} section [{off}, +{ln}) runs past the blob end "
                                 f"({len(d) - hdr_len} bytes after the header)")
        if type_off % 4:
            raise ImageError(f"BTF type section offset {type_off} is not 4-byte aligned")
        if str_len == 0 or d[hdr_len + str_off] != 0:
            raise ImageError("BTF string section must start with an empty string")
        if d[hdr_len + str_off + str_len - 1] != 0:
            raise ImageError("BTF string section is not NUL-terminated")
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        self.strings = d[self._str_start:self._str_end]

    def _index_types(self) -> None:
        """One pass over the type section: record offset, kind, name offset per type."""
        d = self.data
        unpack = struct.unpack_from
        offsets = array("I", [0])  # id 0 = void
        kinds = bytearray(1)
        names: dict[int, int | list[int]] = {}
        pos, end = self._types_start, self._types_end
        fixed, item = _FIXED_EXTRA, _ITEM_SIZE
        str_len = self._str_end - self._str_start
        tid = 0
        while pos < end:
            if pos + 12 > end:
                raise ImageError(f"BTF type {tid + 1} header truncated at byte {pos}")
            name_off, info, _ = unpack("<III", d, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if not 1 <= kind <= ENUM64:
                raise ImageError(f"BTF type {tid + 1} has unknown kind {kind}")
            if name_off >= str_len:
                raise ImageError(f"BTF type {tid + 1} name offset {name_off} outside the "
                                 f"string section ({str_len} bytes)")
            tid += 1
            offsets.append(pos)
            kinds.append(kind)
            if name_off:
                prev = names.get(name_off)
                if prev is None:
                    names[name_off] = tid
                elif isinstance(prev, int):
                    names[name_off] = [prev, tid]
                else:
                    prev.append(tid)
            pos += 12 + fixed.get(kind, 0) + vlen * item.get(kind, 0)
        if pos != end:
            raise ImageError(f"BTF type {tid} runs past the type section end")
        self._offsets = offsets
        self._kinds = bytes(kinds)
        self._names = names

    # ---------------------------------------------------------------- basics
    def __len__(self) -> int:
        """Number of types, void included."""
        return len(self._offsets)

    def string(self, off: int) -> str:
        if not 0 <= off < len(self.strings):
            raise ImageError(f"BTF string offset {off} outside the string section")
        end = self.strings.find(b"\0", off)
        return self.strings[off:end].decode("utf-8", "replace")

    def _string_offsets(self, name: str) -> list[int]:
        """Offsets of `name` in the string section (bytes.find: no full decode)."""
        needle = b"\0" + name.encode() + b"\0"
        out, s = [], self.strings
        i = s.find(needle)
        while i >= 0:
            out.append(i + 1)
            i = s.find(needle, i + 1)
        return out

    def _ids_named(self, name: str) -> list[int]:
        ids: list[int] = []
        for off in self._string_offsets(name):
            v = self._names.get(off)
            if v is not None:
                ids.extend([v] if isinstance(v, int) else v)
        return sorted(ids)

    def kind_of(self, tid: int) -> int:
        self._check_id(tid)
        return self._kinds[tid]

    def _check_id(self, tid: int, referrer: int | None = None) -> None:
        if not 0 <= tid < len(self._offsets):
            who = f"type {referrer} refers to " if referrer is not None else ""
            raise ImageError(f"BTF {who}type id {tid}, but there are only {len(self._offsets) - 1} types")

    def get(self, tid: int) -> Type:
        """Decode type `tid` (cached)."""
        t = self._cache.get(tid)
        if t is None:
            t = self._decode(tid)
            self._cache[tid] = t
        return t

    def _decode(self, tid: int) -> Type:
        self._check_id(tid)
        if tid == 0:
            return VOID
        d, pos = self.data, self._offsets[tid]
        unpack = struct.unpack_from
        name_off, info, size_type = unpack("<III", d, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        t = Type(id=tid, kind=kind, name=self.string(name_off), kind_flag=kflag, vlen=vlen)
        p = pos + 12
        ntypes = len(self._offsets)

        def ref(x: int) -> int:
            if x >= ntypes:
                raise ImageError(f"BTF type {tid} ({t.kind_name}) refers to type id {x}, "
                                 f"but there are only {ntypes - 1} types")
            return x

        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            t.size = size_type
        else:
            t.ref = size_type
            if kind not in (FWD,):
                ref(size_type)
        if kind == INT:
            (enc,) = unpack("<I", d, p)
            t.int_encoding, t.int_offset, t.int_bits = (enc >> 24) & 0xF, (enc >> 16) & 0xFF, enc & 0xFF
        elif kind == ARRAY:
            t.elem_type, t.index_type, t.nelems = unpack("<III", d, p)
            ref(t.elem_type), ref(t.index_type)
        elif kind in (STRUCT, UNION):
            for i in range(vlen):
                m_name, m_type, m_off = unpack("<III", d, p + 12 * i)
                if kflag:
                    bit_off, bits = m_off & 0xFFFFFF, m_off >> 24
                else:
                    bit_off, bits = m_off, 0
                t.members.append(Member(self.string(m_name), ref(m_type), bit_off, bits))
        elif kind == ENUM:
            for i in range(vlen):
                e_name, val = unpack("<II", d, p + 8 * i)
                if kflag and val >= 1 << 31:  # kind_flag: signed values
                    val -= 1 << 32
                t.enum_values.append(EnumValue(self.string(e_name), val))
        elif kind == ENUM64:
            for i in range(vlen):
                e_name, lo, hi = unpack("<III", d, p + 12 * i)
                val = lo | (hi << 32)
                if kflag and val >= 1 << 63:
                    val -= 1 << 64
                t.enum_values.append(EnumValue(self.string(e_name), val))
        elif kind == FUNC_PROTO:
            for i in range(vlen):
                p_name, p_type = unpack("<II", d, p + 8 * i)
                t.params.append(Param(self.string(p_name), ref(p_type)))
        elif kind == VAR:
            (t.linkage,) = unpack("<I", d, p)
        elif kind == DATASEC:
            for i in range(vlen):
                v_type, v_off, v_size = unpack("<III", d, p + 12 * i)
                t.secinfo.append(VarSecinfo(ref(v_type), v_off, v_size))
        elif kind == DECL_TAG:
            (t.component_idx,) = unpack("<i", d, p)
        elif kind == FUNC:
            t.linkage = vlen
        return t

    # ---------------------------------------------------------------- lookup
    def type(self, name: str) -> Type:
        """Look a type up by name: 'struct rq', 'rq', 'union x', 'enum e', 'u64'.

        Without a kind prefix a struct wins over a union, typedef, enum, then
        anything else; a full definition wins over a forward declaration.
        """
        hit = self._by_type_name.get(name)
        if hit is not None:
            return hit
        t = self._lookup_type(name)
        self._by_type_name[name] = t
        return t

    def _lookup_type(self, name: str) -> Type:
        name = " ".join(name.split())
        want: tuple[int, ...] | None = None
        for prefix, kinds in (("struct ", (STRUCT,)), ("union ", (UNION,)),
                              ("enum ", (ENUM, ENUM64))):
            if name.startswith(prefix):
                want, name = kinds, name[len(prefix):]
                break
        if name == "void":
            return VOID
        ids = self._ids_named(name)
        order = (STRUCT, UNION, TYPEDEF, ENUM, ENUM64, INT, FLOAT, DATASEC, FUNC, VAR, FWD)
        best: int | None = None
        best_rank = len(order) + 1
        for tid in ids:
            k = self._kinds[tid]
            if want is not None and k not in want and not (k == FWD):
                continue
            rank = order.index(k) if k in order else len(order)
            if k == FWD and want is not None:
                fwd_union = self.get(tid).kind_flag
                if (UNION in want) != fwd_union:
                    continue
            if rank < best_rank:
                best, best_rank = tid, rank
        if best is None:
            raise TypeNotFound(f"no BTF type named {name!r}"
                               + hint(name, self.type_names()))
        return self.get(best)

    def type_names(self) -> list[str]:
        """Every named type's name (decoded once, for suggestions and listing)."""
        if self._all_names is None:
            self._all_names = sorted({self.string(off) for off in self._names})
        return self._all_names

    def resolve(self, t: Type | int) -> Type:
        """Skip typedef/const/volatile/restrict/type_tag to the underlying type."""
        if isinstance(t, int):
            t = self.get(t)
        for _ in range(MAX_CHAIN):
            if t.kind not in MODIFIERS:
                return t
            t = self.get(t.ref)
        raise ImageError(f"BTF modifier chain from type {t.id} is a cycle or deeper than {MAX_CHAIN}")

    def sizeof(self, t: Type | int | str, _depth: int = 0) -> int:
        if isinstance(t, str):
            t = self.type(t)
        if isinstance(t, int):
            t = self.get(t)
        if _depth > MAX_CHAIN:
            raise ImageError(f"BTF type {t.id} ({t.kind_name}): its size depends on itself "
                             f"or on more than {MAX_CHAIN} nested types (a cycle: corrupt BTF)")
        t = self.resolve(t)
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return t.size
        if t.kind == PTR:
            return POINTER_SIZE
        if t.kind == ARRAY:
            return t.nelems * self.sizeof(t.elem_type, _depth + 1)
        if t.kind == VAR:
            return self.sizeof(t.ref, _depth + 1)
        raise KernelFeatureMissing(f"{self.type_name(t)} ({t.kind_name}) has no size")

    def enum_value(self, name: str) -> int:
        """The value of enumerator `name`, searched over every ENUM and ENUM64."""
        if self._enum_index is None:
            self._build_enum_index()
        assert self._enum_index is not None
        for off in self._string_offsets(name):
            hit = self._enum_index.get(off)
            if hit is not None:
                return hit[1]
        raise TypeNotFound(f"no enumerator named {name!r} in BTF"
                           + hint(name, self.enumerator_names()))

    def enum_type_of(self, name: str) -> Type:
        """The enum type that declares enumerator `name`."""
        self.enum_value(name)
        assert self._enum_index is not None
        for off in self._string_offsets(name):
            hit = self._enum_index.get(off)
            if hit is not None:
                return self.get(hit[0])
        raise TypeNotFound(name)  # unreachable: enum_value found it

    def _build_enum_index(self) -> None:
        index: dict[int, tuple[int, int]] = {}
        d, unpack = self.data, struct.unpack_from
        for tid, k in enumerate(self._kinds):
            if k not in (ENUM, ENUM64):
                continue
            pos = self._offsets[tid]
            _, info, _ = unpack("<III", d, pos)
            kflag, vlen = info >> 31, info & 0xFFFF
            for i in range(vlen):
                if k == ENUM:
                    e_name, val = unpack("<II", d, pos + 12 + 8 * i)
                    if kflag and val >= 1 << 31:
                        val -= 1 << 32
                else:
                    e_name, lo, hi = unpack("<III", d, pos + 12 + 12 * i)
                    val = lo | (hi << 32)
                    if kflag and val >= 1 << 63:
                        val -= 1 << 64
                index.setdefault(e_name, (tid, val))
        self._enum_index = index

    def enumerator_names(self) -> list[str]:
        if self._enum_index is None:
            self._build_enum_index()
        assert self._enum_index is not None
        return [self.string(off) for off in self._enum_index]

    def iter_types(self):
        """Every type, decoded, in id order (slow on a full vmlinux: tests and tools)."""
        for tid in range(1, len(self._offsets)):
            yield self.get(tid)

    def ids_of_kind(self, kind: int) -> list[int]:
        return [i for i, k in enumerate(self._kinds) if k == kind and i]

    # ---------------------------------------------------------------- names
    def type_name(self, t: Type | int, _depth: int = 0) -> str:
        """C-like spelling: 'struct rq', 'u64', 'struct task_struct *', 'int[4]'.

        Cycle-safe and bounded: a type that refers back to itself (only corrupt BTF can)
        is an ImageError naming it; a spelling that would visit more than NAME_BUDGET
        types (a hostile graph of function pointers) is cut short with '...'."""
        return self._type_name(t, [], [NAME_BUDGET])

    def _type_name(self, t: Type | int, stack: list[int], budget: list[int]) -> str:
        if isinstance(t, int):
            t = self.get(t)
        k = t.kind
        if k == 0:
            return "void"
        if k in (STRUCT, UNION):
            return f"{t.kind_name} {t.name}" if t.name else f"{t.kind_name} {{...}}"
        if k in (ENUM, ENUM64):
            return f"enum {t.name}" if t.name else "enum {...}"
        if k == FWD:
            return f"{'union' if t.kind_flag else 'struct'} {t.name}"
        if k not in (PTR, CONST, VOLATILE, RESTRICT, TYPE_TAG, ARRAY, FUNC_PROTO):
            return t.name or t.kind_name
        budget[0] -= 1
        if budget[0] < 0:
            return "..."
        if k == FUNC_PROTO:
            return self._proto_name(t, "", 0, stack, budget)
        _enter(stack, t, "naming it")
        try:
            if k == PTR:
                target = self.get(t.ref)
                if self.resolve(target).kind == FUNC_PROTO:
                    return self._proto_name(self.resolve(target), "(*)", 0, stack, budget)
                return self._type_name(target, stack, budget) + " *"
            if k in (CONST, VOLATILE, RESTRICT):
                return f"{t.kind_name} {self._type_name(t.ref, stack, budget)}"
            if k == TYPE_TAG:
                return self._type_name(t.ref, stack, budget)
            return f"{self._type_name(t.elem_type, stack, budget)}[{t.nelems}]"  # ARRAY
        finally:
            stack.pop()

    def _proto_name(self, t: Type, inner: str, depth: int = 0, stack: list[int] | None = None,
                    budget: list[int] | None = None) -> str:
        stack = [] if stack is None else stack
        budget = [NAME_BUDGET] if budget is None else budget
        _enter(stack, t, "naming it")
        try:
            args = ", ".join(self._type_name(p.type_id, stack, budget) if p.type_id else "..."
                             for p in t.params) or "void"
            return f"{self._type_name(t.ref, stack, budget)} {inner}({args})"
        finally:
            stack.pop()

    # ---------------------------------------------------------------- fields
    def find_member(self, t: Type, name: str) -> tuple[int, Member] | None:
        """Member `name` of struct/union t, looking inside anonymous members.

        Returns (bit offset from the start of t, member) or None. Each anonymous type is
        searched once per call (linear in the number of types); one that contains
        itself is an ImageError naming it.
        """
        return self._find_member(t, name, [], set())

    def _find_member(self, t: Type, name: str, stack: list[int],
                     seen: set[int]) -> tuple[int, Member] | None:
        _enter(stack, t, "looking for a member")
        try:
            for m in t.members:
                if m.name == name:
                    return m.bit_offset, m
            for m in t.members:
                if not m.name:
                    inner = self.resolve(m.type_id)
                    if inner.kind in (STRUCT, UNION):
                        if inner.id in stack:
                            _enter(stack, inner, "looking for a member")  # raises
                        if inner.id in seen:
                            continue
                        seen.add(inner.id)
                        hit = self._find_member(inner, name, stack, seen)
                        if hit is not None:
                            return m.bit_offset + hit[0], hit[1]
            return None
        finally:
            stack.pop()

    def member_names(self, t: Type, _depth: int = 0) -> list[str]:
        """Names reachable as one path component (anonymous members flattened; each
        anonymous type once; one that contains itself is an ImageError naming it)."""
        out: list[str] = []
        self._member_names(t, out, [], set())
        return out

    def _member_names(self, t: Type, out: list[str], stack: list[int], seen: set[int]) -> None:
        _enter(stack, t, "listing its members")
        try:
            for m in t.members:
                if m.name:
                    out.append(m.name)
                else:
                    inner = self.resolve(m.type_id)
                    if inner.kind in (STRUCT, UNION):
                        if inner.id in stack:
                            _enter(stack, inner, "listing its members")  # raises
                        if inner.id not in seen:
                            seen.add(inner.id)
                            self._member_names(inner, out, stack, seen)
        finally:
            stack.pop()

    def field(self, type_name: str | Type, path: str) -> Field:
        """Offset, size and bit position of `path` (e.g. 'scx.flags', 'cpus[3].x')."""
        root = self.type(type_name) if isinstance(type_name, str) else type_name
        cur = root
        bits = 0
        bitfield = 0
        walked = self.type_name(root)
        for comp in parse_path(path):
            res = self.resolve(cur)
            if comp == "->" or (res.kind == PTR):
                raise FieldPathError(
                    f"{walked!s} is a pointer ({self.type_name(res)}): offsetof does not "
                    f"follow pointers; read the pointer and start again from its target type")
            if isinstance(comp, int):
                if res.kind != ARRAY:
                    raise FieldPathError(f"cannot index {walked} (type {self.type_name(res)}) "
                                         f"with [{comp}]: not an array")
                if res.nelems and comp >= res.nelems:
                    raise FieldPathError(f"index [{comp}] out of bounds for {walked} "
                                         f"({self.type_name(res)}, {res.nelems} elements)")
                bits += comp * self.sizeof(res.elem_type) * 8
                cur = self.get(res.elem_type)
                bitfield = 0
                walked += f"[{comp}]"
                continue
            if res.kind not in (STRUCT, UNION):
                raise FieldPathError(f"{walked} is {self.type_name(res)}, not a struct or union: "
                                     f"no member {comp!r}")
            hit = self.find_member(res, comp)
            if hit is None:
                raise FieldPathError(f"{self.type_name(res)} has no member {comp!r} "
                                     f"(path {path!r})" + hint(comp, self.member_names(res)))
            off, m = hit
            bits += off
            cur = self.get(m.type_id)
            bitfield = m.bitfield_size
            if not bitfield:  # pre-kind_flag encoding: a narrower INT is a bitfield
                r = self.resolve(cur)
                if r.kind == INT and r.int_bits and r.int_bits != r.size * 8:
                    bitfield = r.int_bits
                    bits += r.int_offset
            walked += f".{comp}"
        size = self.sizeof(cur)
        if not bitfield:
            if bits % 8:
                raise ImageError(f"{walked} starts at bit {bits}, not on a byte boundary")
            return Field(bits // 8, size, cur, 0, 0)
        return self._bitfield(bits, bitfield, size, cur)

    @staticmethod
    def _bitfield(bits: int, nbits: int, unit: int, t: Type) -> Field:
        # The storage unit is the declared type, aligned to its size (as pahole shows);
        # in packed structs it may straddle: then fall back to the enclosing bytes.
        if unit in (1, 2, 4, 8):
            start = (bits // 8) & ~(unit - 1)
            if bits - start * 8 + nbits <= unit * 8:
                return Field(start, unit, t, bits - start * 8, nbits)
        start = bits // 8
        size = (bits - start * 8 + nbits + 7) // 8
        return Field(start, size, t, bits - start * 8, nbits)

    def offsetof(self, type_name: str | Type, path: str) -> int:
        return self.field(type_name, path).offset

    def format_type(self, type_name: str | Type) -> str:
        """pahole-like layout of a struct/union (offsets, sizes, holes) or enum."""
        from vmm.kernel.btf_format import format_type

        return format_type(self, type_name)
