"""On-disk cache of parsed introspection data, keyed by the content it was parsed from.

Parsing a distro vmlinux's .symtab takes about a second; the pickled result loads
faster. Entries live under $VMM_CACHE_DIR/introspection (default ~/.cache/vmm).
The key of a symbol table is a sha256 of the bytes it is parsed from (.symtab, its
string table and the section headers, see symtab_key): a vmlinux patched in place
keeps its build id and symbol count but gets a new key. Hashing those sections of a
distro vmlinux (~10 MB) costs milliseconds; a hit is logged on the "vmm.kernel.cache"
logger (INFO) with the entry's path.
A corrupt or unreadable entry is ignored and rewritten; a cache that cannot be
written (read-only home) only costs speed.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vmm.hostio import atomic_output
from vmm.resources import cache_dir

T = TypeVar("T")
FORMAT_VERSION = 2  # 2: content keys (symtab_key)
log = logging.getLogger("vmm.kernel.cache")


def symtab_key(elf) -> str | None:
    """Cache key of elf's symbol table: sha256 of .symtab, the string table it links to
    and every section header (names, addresses, sizes: they decide each symbol's
    section and per-CPU flag). None when there is no .symtab."""
    symtab = elf.section(".symtab")
    if symtab is None:
        return None
    h = hashlib.sha256()
    h.update(repr(list(elf.sections)).encode())
    h.update(elf.section_data(symtab))
    if 0 <= symtab.link < len(elf.sections):
        h.update(elf.section_data(elf.sections[symtab.link]))
    return f"symtab-sha256-{h.hexdigest()[:48]}"


def cache_root() -> Path:
    """The directory of the introspection cache (under the vmm cache directory)."""
    return cache_dir("introspection")


def entry_path(key: str) -> Path:
    """The cache file of `key` (unsafe characters replaced)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:200]
    return cache_root() / f"{safe}.pickle"


def load(key: str):
    """The cached value for key, or None when absent or unreadable."""
    path = entry_path(key)
    try:
        with open(path, "rb") as f:
            version, stored_key, value = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception:  # truncated, garbage, old class layout: treat as a miss
        return None
    if version != FORMAT_VERSION or stored_key != key:
        return None
    return value


def store(key: str, value) -> None:
    """Write value under key atomically; an unwritable cache is skipped silently."""
    path = entry_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic (temp name, fsync, os.replace): readers never see half an entry, and a
        # writer killed mid-dump leaves only a temporary that the next store sweeps.
        with atomic_output(path) as f:
            pickle.dump((FORMAT_VERSION, key, value), f, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError:
        pass


def cached(key: str | None, compute: Callable[[], T],
           valid: Callable[[object], bool] = lambda v: True) -> T:
    """compute(), or its stored result for key; an entry failing `valid` is recomputed."""
    if key is None:
        return compute()
    hit = load(key)
    if hit is not None and valid(hit):
        log.info("using cached %s from %s", key, entry_path(key))
        return hit
    value = compute()
    store(key, value)
    return value
