"""Member paths through BTF types: 'scx.flags', 'cpus[3].x' -> offset, size and bit
position (the Btf class's field half: a mixin; Btf supplies type(), get(), resolve(),
sizeof() and type_name())."""

from __future__ import annotations

import re

from vmm.errors import FieldPathError, ImageError
from vmm.kernel.btf_types import ARRAY, INT, PTR, STRUCT, UNION, Field, Member, Type, _enter
from vmm.kernel.suggest import hint

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


class FieldPaths:
    """find_member(), member_names(), field() and offsetof() over struct/union types."""

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
        """Byte offset of `path` in the type (field(...).offset)."""
        return self.field(type_name, path).offset
