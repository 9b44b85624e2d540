"""A BPF map's value through the map's own BTF: decoded into Python (decode_value), a
field located by its path (locate_field) and a new value checked against it
(encode_field), and the planned store (WriteEntry) vmm.kernel.bpf_maps hands to the
session's op path. Plain functions over a parsed Btf and bytes; no guest memory.

Values: a struct or union becomes a dict of its members (anonymous members merged in,
bitfields as their bits), a DATASEC (.bss/.data/.rodata) a dict of its variables, an
integer, enum or pointer an int, an array of ``char`` bytes, other arrays a list, a float
a float.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

from vmm.errors import FieldPathError, ImageError, InvalidValue
from vmm.kernel.btf import (ARRAY, DATASEC, ENUM, ENUM64, FLOAT, INT, INT_BOOL, INT_CHAR, PTR,
                            STRUCT, UNION, VAR, Btf)
from vmm.kernel.suggest import hint


@dataclass(frozen=True)
class WriteEntry:
    """One planned store: ``width`` bytes at ``kva``; ``value`` an int (width 4 or 8) or
    bytes (any width; copied)."""

    kva: int
    width: int
    value: Any
    description: str


# --- values through a map's BTF -----------------------------------------------------------
def _int_value(t, raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=t.signed)


def _is_char(btf: Btf, type_id: int) -> bool:
    """A plain or signed ``char`` (clang encodes it as a signed 1-byte INT named "char")."""
    t = btf.resolve(type_id)
    return t.kind == INT and t.size == 1 and (t.name in ("char", "signed char")
                                              or bool(t.int_encoding & INT_CHAR))


def decode_value(btf: Btf, type_id: int, raw: bytes, _depth: int = 0) -> Any:
    """``raw`` as BTF type ``type_id`` reads (module doc)."""
    if _depth > 64:
        raise ImageError(f"BTF type {type_id}: nested more than 64 deep while decoding")
    t = btf.resolve(type_id)
    k = t.kind
    if k == VAR:
        return decode_value(btf, t.ref, raw, _depth + 1)
    if k in (INT, ENUM, ENUM64):
        if k == INT and t.size == 1 and t.int_encoding & INT_BOOL:
            return bool(raw[0])
        return _int_value(t, raw[:t.size])
    if k == PTR:
        return struct.unpack_from("<Q", raw)[0]
    if k == FLOAT and t.size in (4, 8):
        return struct.unpack("<f" if t.size == 4 else "<d", raw[:t.size])[0]
    if k == ARRAY:
        size = btf.sizeof(t.elem_type)
        if _is_char(btf, t.elem_type):
            return bytes(raw[:size * t.nelems])
        return [decode_value(btf, t.elem_type, raw[i * size:(i + 1) * size], _depth + 1)
                for i in range(t.nelems)]
    if k in (STRUCT, UNION):
        out: dict[str, Any] = {}
        for m in t.members:
            mt = btf.resolve(m.type_id)
            bits = m.bitfield_size
            if not bits and mt.kind == INT and mt.int_bits and mt.int_bits != mt.size * 8:
                bits = mt.int_bits  # the encoding before kind_flag
            if bits:
                start = m.bit_offset // 8
                span = (m.bit_offset % 8 + bits + 7) // 8
                v = int.from_bytes(raw[start:start + span], "little") >> (m.bit_offset % 8)
                v &= (1 << bits) - 1
                if mt.signed and v >> (bits - 1):
                    v -= 1 << bits
                value: Any = v
            else:
                start = m.bit_offset // 8
                value = decode_value(btf, m.type_id, raw[start:start + btf.sizeof(m.type_id)],
                                     _depth + 1)
            if not m.name and isinstance(value, dict):
                out.update(value)
            else:
                out[m.name] = value
        return out
    if k == DATASEC:
        out = {}
        for v in t.secinfo:
            var = btf.get(v.type_id)
            out[var.name] = decode_value(btf, var.ref if var.kind == VAR else v.type_id,
                                         raw[v.offset:v.offset + v.size], _depth + 1)
        return out
    return bytes(raw)


_FIRST = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(.*)$", re.S)


def locate_field(btf: Btf, type_id: int, path: str):
    """(offset, size, Type, bit_size) of ``path`` in the value type: a member path
    ("nr_enq", "a.b[2]") of a struct, or a variable (and a path in it: "stats.nr") of a
    DATASEC. FieldPathError naming close names for an unknown one."""
    t = btf.resolve(type_id)
    if t.kind == DATASEC:
        m = _FIRST.match(path)
        if not m:
            raise FieldPathError(f"bad field path {path!r}")
        name, rest = m.group(1), m.group(2).strip()
        names = []
        for v in t.secinfo:
            var = btf.get(v.type_id)
            names.append(var.name)
            if var.name == name:
                vt = var.ref if var.kind == VAR else v.type_id
                if not rest:
                    return v.offset, v.size, btf.get(vt), 0
                if rest.startswith("."):
                    rest = rest[1:]
                f = btf.field(btf.get(vt), rest)
                return v.offset + f.offset, f.size, f.type, f.bit_size
        raise FieldPathError(f"{t.name} has no variable {name!r}" + hint(name, names))
    if t.kind not in (STRUCT, UNION):
        raise FieldPathError(f"the value is {btf.type_name(t)}, not a struct or a section: "
                             f"write it whole with the key '' ")
    f = btf.field(t, path)
    return f.offset, f.size, f.type, f.bit_size


def encode_field(btf: Btf, ftype, size: int, value: Any, what: str) -> Any:
    """``value`` checked against a field of ``size`` bytes and type ``ftype``: an int for a
    4/8-byte integer, enum or pointer; bytes otherwise. InvalidValue when it does not fit."""
    t = btf.resolve(ftype)
    decl = btf.type_name(ftype)  # as declared: u32, not unsigned int
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) != size:
            raise InvalidValue(f"{what}: {len(data)} bytes for a {size}-byte field "
                               f"({decl}): the width must match")
        return data
    if isinstance(value, str) and t.kind == ARRAY and _is_char(btf, t.elem_type):
        data = value.encode()
        if len(data) >= size:
            raise InvalidValue(f"{what}: {value!r} needs {len(data) + 1} bytes with its NUL; "
                               f"the field has {size}")
        return data.ljust(size, b"\0")
    if isinstance(value, int) and t.kind in (INT, ENUM, ENUM64, PTR) and size in (1, 2, 4, 8):
        bits = size * 8
        if isinstance(value, bool):
            value = int(value)
        lo = -(1 << (bits - 1)) if t.signed else 0
        hi = (1 << (bits - 1)) - 1 if t.signed else (1 << bits) - 1
        if t.kind == PTR or (t.kind in (ENUM, ENUM64) and not t.signed):
            lo = -(1 << (bits - 1))
        if not lo <= value <= hi:
            raise InvalidValue(f"{what}: {value} does not fit {decl} "
                               f"({size} bytes, {lo}..{hi})")
        value &= (1 << bits) - 1
        return value if size in (4, 8) else value.to_bytes(size, "little")
    raise InvalidValue(f"{what}: cannot store {type(value).__name__} {value!r:.40} into "
                       f"{decl} ({size} bytes): an int for integers, bytes of the "
                       f"field's width otherwise")
