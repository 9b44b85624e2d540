"""'Did you mean' suggestions that stay fast over 100k+ kernel names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to n names close to `name`.

    difflib over every kernel symbol takes seconds, so first keep only plausible
    candidates: those containing `name` (or contained in it), or of similar length
    sharing the first character. difflib ranks what is left.
    """
    if not name:
        return []
    low = name.lower()
    contains: list[str] = []
    similar: list[str] = []
    first = low[0]
    lo, hi = len(name) * 2 // 3, len(name) * 3 // 2 + 2
    for cand in candidates:
        if not cand or cand == name:
            continue
        c = cand.lower()
        if len(low) >= 3 and (low in c or (len(c) >= 4 and c in low)):
            contains.append(cand)
        elif c[0] == first and lo <= len(cand) <= hi:
            similar.append(cand)
    ranked = difflib.get_close_matches(name, similar, n=n, cutoff=0.6)
    contains.sort(key=lambda c: (len(c), c))
    out: list[str] = []
    for c in ranked + contains:
        if c not in out:
            out.append(c)
    return out[:n]


def hint(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean: a, b?)' or ''."""
    names = close_names(name, candidates)
    return f" (did you mean: {', '.join(names)}?)" if names else ""
