"""System.map / /proc/kallsyms text: one 'address type name [module]' per line."""

from __future__ import annotations

import os
import re

from vmm.errors import ImageError
from vmm.kernel.symbols import Symbol

MAX_LINE = 4096
# Plain hex of at most 64 bits: int(x, 16) alone would also take "-", "+", "0x" and "_".
_HEX64 = re.compile(rb"[0-9a-fA-F]{1,16}")


def parse_system_map(source: str | os.PathLike | bytes, what: str | None = None) -> list[Symbol]:
    """Parse System.map text (a path or its bytes) into Symbols (sizes unknown: 0)."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        what = what or "System.map"
    else:
        what = what or os.fspath(source)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"cannot read System.map {what}: {e.strerror}") from None
    if b"\0" in data:
        raise ImageError(f"{what} is not a System.map: it contains NUL bytes (binary file?)")
    out: list[Symbol] = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if len(line) > MAX_LINE:
            raise ImageError(f"{what} line {lineno}: longer than {MAX_LINE} characters")
        parts = line.split()
        if len(parts) == 4 and parts[3].startswith(b"[") and parts[3].endswith(b"]"):
            parts = parts[:3]  # kallsyms module column
        if len(parts) != 3 or len(parts[1]) != 1:
            text = line[:80].decode("utf-8", "replace")
            extra = (" (Debian's linux-image package ships a placeholder System.map: the real "
                     "one is in the -dbg package)" if b"System.map" in line else "")
            raise ImageError(f"{what} line {lineno}: {text!r} is not 'address type name'{extra}")
        addr_s, typ, name = parts
        if not _HEX64.fullmatch(addr_s):
            raise ImageError(f"{what} line {lineno}: bad address {addr_s[:40]!r}: expected 1 to 16 "
                             "hex digits (an address of at most 64 bits, no sign, prefix or "
                             "underscores)")
        addr = int(addr_s, 16)
        out.append(Symbol(name.decode("utf-8", "replace"), addr, 0, typ.decode("ascii", "replace"), ""))
    if not out:
        raise ImageError(f"{what} holds no symbols")
    return out
