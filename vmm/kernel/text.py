"""Printable text for the CLI (`vmm symbols`, `vmm btf`)."""

from __future__ import annotations

import fnmatch

from vmm.kernel.btf import ENUM, ENUM64

MAX_LISTED = 200


def format_symbols(kernel, name: str | None = None) -> str:
    """One symbol ('addr type name size section [per-CPU]'), every match of a glob
    ('scx_*'), the symbol an address ('0xffffffff81000123') falls in, or without a
    name a summary of the table."""
    syms = kernel.symbols
    if name is None:
        lines = [f"kernel: {', '.join(kernel.sources) or '?'}",
                 f"build id: {kernel.build_id or 'none'}",
                 f"symbols: {len(syms)}",
                 f"per-CPU style: {syms.percpu_style or 'unknown'}",
                 f"BTF: {f'{len(kernel.btf) - 1} types' if kernel.has_btf else 'none'}"]
        return "\n".join(lines)
    if name.lower().startswith("0x"):  # an address: which symbol is it in?
        try:
            addr = int(name, 16)
        except ValueError:
            pass
        else:
            return f"{addr:016x} {syms.format_address(addr)}"
    if any(c in name for c in "*?["):  # a glob: list the matches, address order
        matches = sorted((s for s in syms if fnmatch.fnmatchcase(s.name, name)),
                         key=lambda s: (s.address, s.name))
        lines = [_symbol_line(s) for s in matches[:MAX_LISTED]]
        if len(matches) > MAX_LISTED:
            lines.append(f"... {len(matches) - MAX_LISTED} more")
        return "\n".join(lines) if lines else f"no symbol matches {name!r}"
    return "\n".join(_symbol_line(s) for s in syms.duplicates(name))


def _symbol_line(s) -> str:
    extra = " per-CPU" if s.percpu else ""
    size = f" size={s.size:#x}" if s.size else ""
    sec = f" [{s.section}]" if s.section else ""
    return f"{s.address:016x} {s.type} {s.name}{size}{sec}{extra}"


def format_btf(kernel, type_name: str, field: str | None = None) -> str:
    """The layout of a type, one field's position, or an enumerator's value."""
    btf = kernel.btf
    if field is None:
        if type_name and type_name[0].isupper() and " " not in type_name:
            # SCX_RQ_CLK_VALID-style names are enumerators, not types.
            try:
                value = btf.enum_value(type_name)
            except Exception:
                pass
            else:
                t = btf.enum_type_of(type_name)
                kind = "enum" if t.kind in (ENUM, ENUM64) else t.kind_name
                return f"{type_name} = {value} ({value:#x}) in {kind} {t.name or '(anonymous)'}"
        return btf.format_type(type_name)
    f = btf.field(type_name, field)
    where = f"offset {f.offset} ({f.offset:#x}), size {f.size}"
    if f.bit_size:
        where += f", bits {f.bit_offset}..{f.bit_offset + f.bit_size - 1} ({f.bit_size} bits)"
    return f"{type_name}.{field}: {btf.type_name(f.type)}, {where}"
