"""BTF (BPF Type Format) parser: the whole format of Documentation/bpf/btf.rst.

A vmlinux .BTF blob holds ~100k types. Decoding all of them in Python costs seconds,
so loading only *indexes* the type section (one pass recording where each type starts,
its kind and its name offset); a type is decoded the first time something asks for it.

Type ids: 0 is `void`; the first record in the type section is id 1.
"""

from __future__ import annotations

import struct
from array import array

from vmm.errors import ImageError, KernelFeatureMissing, TypeNotFound
from vmm.kernel.suggest import hint

# The data model and the three parts of the Btf class (names, member paths, pahole
# layouts) live beside this file; their names are re-exported here, where callers have
# always found them.
from vmm.kernel.btf_format import TypeLayout
from vmm.kernel.btf_names import TypeNames
from vmm.kernel.btf_paths import FieldPaths, parse_path  # noqa: F401
from vmm.kernel.btf_types import (  # noqa: F401 (CONST ... INT_*, Field, _enter: re-exported)
    ARRAY, CONST, DATASEC, DECL_TAG, ENUM, ENUM64, FLOAT, FUNC, FUNC_PROTO, FWD, INT, INT_BOOL,
    INT_CHAR, INT_SIGNED, KIND_NAMES, MAX_CHAIN, MODIFIERS, NAME_BUDGET, POINTER_SIZE, PTR,
    RESTRICT, STRUCT, TYPE_TAG, TYPEDEF, UNION, VAR, VOID, VOLATILE, EnumValue, Field, Member,
    Param, Type, VarSecinfo, _enter,
)

BTF_MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off/len, str_off/len
# Bytes that follow the 12-byte common header: fixed part, then vlen * per-item size.
_FIXED_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_ITEM_SIZE = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}


class Btf(TypeNames, FieldPaths, TypeLayout):
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
        """The string at offset `off` of the string section; ImageError outside it."""
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
        """The BTF_KIND_* of type `tid`, without decoding it."""
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
        """Size in bytes of a type (id, Type or name), through typedefs, modifiers and arrays."""
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
        """Every enumerator name in the BTF (for suggestions)."""
        if self._enum_index is None:
            self._build_enum_index()
        assert self._enum_index is not None
        return [self.string(off) for off in self._enum_index]

    def iter_types(self):
        """Every type, decoded, in id order (slow on a full vmlinux: tests and tools)."""
        for tid in range(1, len(self._offsets)):
            yield self.get(tid)

    def ids_of_kind(self, kind: int) -> list[int]:
        """The ids of every type of kind `kind`."""
        return [i for i, k in enumerate(self._kinds) if k == kind and i]
