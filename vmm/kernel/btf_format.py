"""pahole-like printing of a BTF struct/union/enum layout: the Btf class's printing half
(a mixin beside btf_names and btf_paths; Btf supplies get(), resolve(), type(), sizeof(),
and inherits type_name()/_proto_name() and _bitfield()). It imports only the data model,
so btf.py imports it and not the other way round."""

from __future__ import annotations

from vmm.kernel.btf_types import ARRAY, ENUM, ENUM64, FUNC_PROTO, PTR, STRUCT, UNION, Type, _enter

CACHELINE = 64


class TypeLayout:
    """format_type(): pahole's view of one type."""

    def format_type(self, type_name: str | Type) -> str:
        """pahole-like layout of a struct/union (offsets, sizes, holes) or an enum's values."""
        return format_type(self, type_name)


def _decl(btf: TypeLayout, type_id: int, name: str) -> str:
    """C declaration of `name` with type `type_id` ('int a[4]', 'void (*fn)(int)')."""
    t = btf.get(type_id)
    dims = ""
    seen: list[int] = []
    while t.kind == ARRAY:
        _enter(seen, t, "printing an array")  # an array of itself: ImageError naming it
        dims += f"[{t.nelems}]"
        t = btf.get(t.elem_type)
    if t.kind == PTR and btf.resolve(t.ref).kind == FUNC_PROTO:
        return btf._proto_name(btf.resolve(t.ref), f"(*{name}{dims})")
    return f"{btf.type_name(t):<26} {name}{dims}"


def format_type(btf: TypeLayout, type_name: str | Type) -> str:
    """pahole-like layout of a struct or union (offsets, sizes, holes) or an enum's values
    (`btf`: a Btf)."""
    t = btf.type(type_name) if isinstance(type_name, str) else type_name
    r = btf.resolve(t)
    if r.kind in (ENUM, ENUM64):
        lines = [f"{btf.type_name(r)} {{"]
        lines += [f"\t{v.name} = {v.value}," for v in r.enum_values]
        lines.append(f"}};  /* size: {r.size} */")
        return "\n".join(lines)
    if r.kind not in (STRUCT, UNION):
        head = f"typedef {btf.type_name(r)} {t.name};" if t is not r else btf.type_name(r)
        try:
            return f"{head}  /* size: {btf.sizeof(r)} */"
        except Exception:
            return head
    lines = [f"{btf.type_name(r)} {{"]
    _members(btf, r, 0, 1, lines, [], set())
    nmembers = len(r.members)
    lines.append(f"\n\t/* size: {r.size}, cachelines: {(r.size + CACHELINE - 1) // CACHELINE}, "
                 f"members: {nmembers} */")
    lines.append("};")
    return "\n".join(lines)


def _members(btf: TypeLayout, t: Type, base_bits: int, depth: int, lines: list[str],
             stack: list[int], seen: set[int]) -> None:
    """Each anonymous type is expanded once (linear); one containing itself is an
    ImageError naming it."""
    _enter(stack, t, "printing its members")
    try:
        _members_of(btf, t, base_bits, depth, lines, stack, seen)
    finally:
        stack.pop()


def _members_of(btf: TypeLayout, t: Type, base_bits: int, depth: int, lines: list[str],
                stack: list[int], seen: set[int]) -> None:
    ind = "\t" * depth
    next_free = base_bits  # end (in bits) of the previous member, for holes
    last_line = base_bits // 8 // CACHELINE
    for m in t.members:
        bits = base_bits + m.bit_offset
        inner = btf.resolve(m.type_id)
        try:
            size = btf.sizeof(m.type_id)
        except Exception:
            size = 0
        if t.kind == STRUCT and not m.bitfield_size and bits // 8 > (next_free + 7) // 8:
            hole = bits // 8 - (next_free + 7) // 8
            lines.append(f"\n{ind}/* XXX {hole} byte{'s' if hole > 1 else ''} hole, try to pack */\n")
        line = bits // 8 // CACHELINE
        if depth == 1 and line != last_line and bits % (CACHELINE * 8) == 0:
            lines.append(f"{ind}/* --- cacheline {line} boundary ({line * CACHELINE} bytes) --- */")
        last_line = line
        if not m.name and inner.kind in (STRUCT, UNION) and inner.id in stack:
            _enter(stack, inner, "printing its members")  # raises: a cycle
        if not m.name and inner.kind in (STRUCT, UNION) and inner.id in seen:
            lines.append(f"{ind}{inner.kind_name} {{ /* type {inner.id}, shown above */ }};")
        elif not m.name and inner.kind in (STRUCT, UNION):
            seen.add(inner.id)
            lines.append(f"{ind}{inner.kind_name} {{")
            _members(btf, inner, bits, depth + 1, lines, stack, seen)
            lines.append(f"{ind}}};{'':<30}/* {bits // 8:>5} {size:>5} */")
        elif m.bitfield_size:
            f = btf._bitfield(bits, m.bitfield_size, size, btf.get(m.type_id))
            lines.append(f"{ind}{_decl(btf, m.type_id, m.name)}:{m.bitfield_size};"
                         f"  /* {f.offset:>5}:{f.bit_offset:>2} {f.size:>4} */")
        else:
            lines.append(f"{ind}{_decl(btf, m.type_id, m.name)};  /* {bits // 8:>5} {size:>5} */")
        end = bits + (m.bitfield_size or size * 8)
        if t.kind == STRUCT:
            next_free = max(next_free, end)
