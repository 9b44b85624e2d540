"""Name the instruction a PVM host could not emulate, and how to avoid it.

``describe_failure`` reads the bytes at the vCPU's RIP (vmm.arch.x86.paging.read_code),
names the instruction (``identify``), the kernel symbol when one is known, and a
command-line option that keeps Linux away from it (see cmdline.py).
"""

from __future__ import annotations

from typing import Callable

from vmm.arch.x86.decode import PREFIX_BYTES, decode_mxcsr
from vmm.arch.x86.paging import MAX_INSTRUCTION, read_code
from vmm.errors import VmmError


def identify(code: bytes) -> tuple[str, str | None]:
    """(what the bytes look like, a hint to avoid it) for the usual emulator failures."""
    insn = decode_mxcsr(code)
    if insn is not None:
        return f"{insn.mnemonic} {insn.operand.describe()}", None
    i = 0
    while i < len(code) and code[i] in PREFIX_BYTES:
        i += 1
    prefixes, rest = code[:i], code[i:]
    rex_w = False
    if rest[:1] and 0x40 <= rest[0] <= 0x4F:
        rex_w = bool(rest[0] & 8)
        rest = rest[1:]
    if not rest:
        return "unreadable instruction", None
    if rest[0] == 0xCC:
        return "int3", None
    if rest[0] == 0xCD and len(rest) > 1:
        return f"int ${rest[1]:#x}", None
    if rest[0] in (0xC4, 0xC5):
        return "VEX-encoded instruction (AVX/BMI)", "hide the feature with clearcpuid= (avx, avx2, bmi1, bmi2)"
    if rest[0] == 0x0F and len(rest) > 1:
        op = rest[1]
        modrm = rest[2] if len(rest) > 2 else 0
        reg = (modrm >> 3) & 7
        if op == 0x01 and modrm in (0xCA, 0xCB):
            return ("clac" if modrm == 0xCA else "stac"), "add smap to clearcpuid="
        if op == 0xB8 and 0xF3 in prefixes:
            return "popcnt", "add popcnt to clearcpuid="
        if op == 0xC7 and reg == 1 and modrm >> 6 != 3:
            return ("cmpxchg16b" if rex_w else "cmpxchg8b"), "add cx16 to clearcpuid="
        if op == 0xAE and modrm >> 6 != 3 and reg in (4, 5):
            return ("xsave" if reg == 4 else "xrstor"), "add noxsave to the command line"
        if op == 0xC7 and modrm >> 6 == 3 and reg in (6, 7):
            return ("rdrand" if reg == 6 else "rdseed"), "add rdrand,rdseed to clearcpuid="
        if op == 0x38 and len(rest) > 2 and rest[2] in (0x00, 0x04, 0x0B):
            return "SSSE3 instruction", "add ssse3 to clearcpuid="
    return "instruction the host cannot emulate", None


def _symbolize(symbols, addr: int) -> str | None:
    if symbols is None:
        return None
    try:
        if hasattr(symbols, "nearest"):
            name, offset = symbols.nearest(addr)
            return f"{name}+{offset:#x}"
        if callable(symbols):
            return symbols(addr)
    except VmmError:
        return None
    return None


def describe_failure(vcpu, memory, symbols: object | Callable[[int], str | None] = None) -> str:
    """One line naming why a vCPU stopped on an emulation failure.

    ``symbols``: a SymbolTable (``nearest(addr) -> (name, offset)``) or a callable
    returning "name+0xoff"; gives e.g. ``int3_selftest+0x1e``.
    """
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except VmmError as e:
        return f"vCPU {getattr(vcpu, 'index', '?')}: registers unavailable ({e})"
    code = read_code(memory, sregs, regs.rip, MAX_INSTRUCTION)
    text = f"vCPU {getattr(vcpu, 'index', '?')} RIP {regs.rip:#x}"
    where = _symbolize(symbols, regs.rip)
    if where:
        text += f" ({where})"
    text += f": bytes {code.hex(' ') if code else 'unreadable'}"
    if code:
        what, hint = identify(code)
        text += f" = {what}"
        if hint:
            text += f"; {hint}"
    return text
