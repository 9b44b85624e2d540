"""Reading `pahole -C` output: member offsets, sizes and bit offsets, and the struct size
(what the BTF tests compare vmm.kernel.btf against)."""

import re

MEMBER_LINE = re.compile(
    r"^\t+(?P<decl>.*?)\b(?:\(\*(?P<fname>\w+)\)\(.*\)|(?P<name>\w+)(?:\[\d+\])*(?::\d+)?)"
    r"(?: __attribute__\(\(.*\)\))?;\s*/\*\s*(?P<off>\d+)(?::\s*(?P<bit>\d+))?\s+(?P<size>\d+)\s*\*/")


OPEN_LINE = re.compile(r"^\t+(?:struct|union)\s*\{\s*$")
CLOSE_LINE = re.compile(r"^\t+\}\s*(?P<name>\w+)?(?:\[\d+\])*(?: __attribute__\(\(.*\)\))?;"
                        r"\s*/\*\s*(?P<off>\d+)\s+(?P<size>\d+)\s*\*/")


def pahole_members(text: str) -> dict[str, tuple[int, int, int | None]]:
    """path -> (offset, size, bit offset or None) from `pahole -C` output.

    Members of inline anonymous structs/unions keep their bare name (our paths find
    them that way); members of inline named ones get 'name.member'.
    """
    stack: list[list] = [[]]
    for line in text.splitlines()[1:]:
        if OPEN_LINE.match(line):
            stack.append([])
            continue
        c = CLOSE_LINE.match(line)
        if c and len(stack) > 1:
            inner = stack.pop()
            name = c.group("name")
            if name:
                stack[-1].append((name, int(c.group("off")), int(c.group("size")), None))
                inner = [(f"{name}.{n}", o, sz, b) for n, o, sz, b in inner]
            stack[-1].extend(inner)
            continue
        m = MEMBER_LINE.match(line)
        if m:
            name = m.group("name") or m.group("fname")
            bit = int(m.group("bit")) if m.group("bit") is not None else None
            stack[-1].append((name, int(m.group("off")), int(m.group("size")), bit))
    out = {}
    for name, off, size, bit in stack[0]:
        out.setdefault(name, (off, size, bit))
    return out


def pahole_size(text: str) -> int:
    return int(re.search(r"/\* size: (\d+)", text).group(1))
