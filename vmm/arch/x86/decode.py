"""x86-64 instruction decoding for the PVM assists: ModRM/SIB memory operands and
``ldmxcsr``/``stmxcsr`` (legacy 0f ae /2, /3 and VEX ``vldmxcsr``/``vstmxcsr``).

64-bit mode only. Pure functions on bytes; the assists in vmm.machine.pvm use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.arch.x86.paging import MAX_INSTRUCTION
from vmm.arch.x86.regs import MASK32, MASK64

# Register numbers as ModRM/SIB encode them (with REX.B/X/R as bit 3).
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip

# Prefixes: segment overrides, operand/address size, lock, rep/repne.
PREFIX_BYTES = (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3)


@dataclass(frozen=True)
class MemOperand:
    """A decoded ModRM memory operand (64-bit mode)."""

    base: int | None  # GPR number 0..15, or None
    index: int | None
    scale: int  # 1, 2, 4, 8
    disp: int  # sign-extended
    rip_relative: bool = False
    segment: str | None = None  # "fs" or "gs" (the only segments with a base in 64-bit mode)
    addr32: bool = False  # 0x67 prefix: 32-bit address arithmetic

    def describe(self) -> str:
        """The operand in assembler syntax, e.g. `[rip+0x10]` or `[rax+rbx*8-0x8]`."""
        if self.rip_relative:
            inner = f"rip{self.disp:+#x}"
        else:
            parts = []
            if self.base is not None:
                parts.append(GPR_NAMES[self.base])
            if self.index is not None:
                parts.append(f"{GPR_NAMES[self.index]}*{self.scale}")
            inner = "+".join(parts) or "0"
            if self.disp:
                inner += f"{self.disp:+#x}"
        return f"{self.segment + ':' if self.segment else ''}[{inner}]"


@dataclass(frozen=True)
class MxcsrInstruction:
    """A decoded ldmxcsr/stmxcsr (legacy or VEX): direction, length and memory operand."""

    store: bool  # True: stmxcsr m32 (MXCSR -> memory); False: ldmxcsr m32
    length: int  # bytes, prefixes included
    operand: MemOperand
    vex: bool = False  # vldmxcsr / vstmxcsr

    @property
    def mnemonic(self) -> str:
        """'ldmxcsr', 'stmxcsr' or their VEX forms 'vldmxcsr', 'vstmxcsr'."""
        return ("v" if self.vex else "") + ("stmxcsr" if self.store else "ldmxcsr")


def _sign(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def _decode_modrm(code: bytes, i: int, rex_x: int, rex_b: int):
    """ModRM (+SIB, +disp) at code[i] -> (mod, reg, MemOperand or None, next index).

    Returns None when the bytes run out.  A register operand (mod 3) gives operand None.
    """
    if i >= len(code):
        return None
    modrm = code[i]
    i += 1
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        return mod, reg, None, i
    base: int | None = rm | (rex_b << 3)
    index = None
    scale = 1
    rip_relative = False
    disp_size = {0: 0, 1: 1, 2: 4}[mod]
    if rm == 4:  # a SIB byte follows (also for r12: only the low 3 bits count)
        if i >= len(code):
            return None
        sib = code[i]
        i += 1
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | (rex_x << 3)
        index = None if idx == 4 else idx  # index 100b without REX.X means none
        base = (sib & 7) | (rex_b << 3)
        if sib & 7 == 5 and mod == 0:  # no base, disp32 (also for r13's encoding)
            base = None
            disp_size = 4
    elif rm == 5 and mod == 0:  # RIP-relative disp32 in 64-bit mode
        base = None
        rip_relative = True
        disp_size = 4
    if i + disp_size > len(code):
        return None
    disp = 0
    if disp_size == 1:
        disp = _sign(code[i], 8)
    elif disp_size == 4:
        disp = _sign(int.from_bytes(code[i : i + 4], "little"), 32)
    i += disp_size
    return mod, reg, MemOperand(base, index, scale, disp, rip_relative), i


def decode_mxcsr(code: bytes) -> MxcsrInstruction | None:
    """Decode ``ldmxcsr``/``stmxcsr`` (0f ae /2, /3; or VEX vldmxcsr/vstmxcsr) at code[0].

    Returns None for any other instruction, or when ``code`` is too short.
    """
    code = bytes(code[:MAX_INSTRUCTION])
    i = 0
    segment = None
    addr32 = False
    while i < len(code):
        b = code[i]
        if b in (0x26, 0x2E, 0x36, 0x3E):  # es/cs/ss/ds: no effect in 64-bit mode
            pass
        elif b == 0x64:
            segment = "fs"
        elif b == 0x65:
            segment = "gs"
        elif b == 0x67:
            addr32 = True
        elif b in (0x66, 0xF2, 0xF3, 0xF0):
            return None  # mandatory prefixes make 0f ae another instruction; lock: #UD
        else:
            break
        i += 1
    if i >= len(code):
        return None
    rex_x = rex_b = 0
    vex = False
    b = code[i]
    if b == 0xC5:  # 2-byte VEX: R vvvv L pp must be 1 1111 0 00 (map 0f implied)
        if i + 1 >= len(code) or code[i + 1] != 0xF8:
            return None
        i += 2
        vex = True
    elif b == 0xC4:  # 3-byte VEX: R X B mmmmm, W vvvv L pp
        if i + 2 >= len(code):
            return None
        b1, b2 = code[i + 1], code[i + 2]
        if b1 & 0x80 == 0 or b1 & 0x1F != 1 or b2 & 0x7F != 0x78:
            return None
        rex_x = 0 if b1 & 0x40 else 1  # stored inverted
        rex_b = 0 if b1 & 0x20 else 1
        i += 3
        vex = True
    else:
        if 0x40 <= b <= 0x4F:  # REX must come right before the opcode
            rex_x, rex_b = (b >> 1) & 1, b & 1
            i += 1
        if code[i : i + 1] != b"\x0f":
            return None
        i += 1
    if code[i : i + 1] != b"\xae":
        return None
    decoded = _decode_modrm(code, i + 1, rex_x, rex_b)
    if decoded is None:
        return None
    _, reg, operand, end = decoded
    if operand is None or reg not in (2, 3):
        return None  # mod 3 forms of 0f ae are fences/rdfsbase..., not ours
    operand = MemOperand(operand.base, operand.index, operand.scale, operand.disp,
                         operand.rip_relative, segment, addr32)  # fmt: skip
    return MxcsrInstruction(store=reg == 3, length=end, operand=operand, vex=vex)


def _reg(regs, number: int) -> int:
    return int(getattr(regs, GPR_NAMES[number]))


def effective_address(op: MemOperand, regs, next_rip: int, fs_base: int = 0, gs_base: int = 0) -> int:
    """Guest virtual address of ``op``; ``regs`` has rax..r15 attributes (struct kvm_regs)."""
    mask = MASK32 if op.addr32 else MASK64
    if op.rip_relative:
        addr = next_rip + op.disp
    else:
        addr = op.disp
        if op.base is not None:
            addr += _reg(regs, op.base) & mask
        if op.index is not None:
            addr += (_reg(regs, op.index) & mask) * op.scale
    addr &= mask
    if op.segment == "fs":
        addr += fs_base
    elif op.segment == "gs":
        addr += gs_base
    return addr & MASK64
