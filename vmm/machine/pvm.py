"""Help a Linux guest through a PVM host's instruction emulator.

On a PVM host (``vmm.kvm.pvm.is_pvm_host()``: /dev/kvm without VMX/SVM) guest ring 0
is emulated instruction by instruction, and the emulator gives up on a few
instructions Linux executes (``KVM_EXIT_INTERNAL_ERROR``, suberror 1).  Two remedies,
both only for PVM hosts (hosts with hardware virtualization never see any of this):

* ``pvm_cmdline(base)``: kernel options that keep Linux away from what cannot be
  emulated (``noxsave``, ``clearcpuid=`` for CPUID features the guest sees because
  CPUID is the L1 host's whatever KVM_SET_CPUID2 says) and from timing checks an
  emulated kernel fails (``lpj=``, ``tsc=reliable``...).
* ``assist_internal_error(vcpu, memory)``: performs, from user space, the few
  instructions Linux cannot avoid: ``int3`` (boot-time ``int3_selftest`` and every
  text patch) and ``ldmxcsr``/``stmxcsr`` (7.x FPU init, ``kernel_fpu_begin``).

``describe_failure`` names an instruction that could not be assisted, with the
kernel symbol when one is known, and a hint when a command-line option avoids it.

The measured facts behind each choice are in shared/notes/kvm-on-this-host.md.
Page walks use ``vmm.kernel.translate.walk`` (CR3, 4- or 5-level).
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Callable

from vmm.errors import VmmError

# Options appended, in this order, unless the command line already sets the same key.
PVM_CMDLINE_OPTIONS = (
    "noxsave",  # xsave/xrstor cannot be emulated
    "nopti",  # page-table isolation doubles the (emulated) entry/exit work
    "mitigations=off",  # speculation mitigations: emulated retpolines/verw only cost
    "lpj=5000000",  # skip delay-loop calibration (meaningless, and slow, under emulation)
    "tsc=reliable",  # the emulated TSC watchdog would mark the TSC unstable
    "no_timer_check",  # the IO-APIC timer check fails when ticks arrive "late"
    "rcupdate.rcu_cpu_stall_suppress=1",  # emulated CPUs look stalled to RCU
    "nokaslr",  # the vmlinux boots where it was linked (host-side decompression) anyway
)
# CPUID features to hide, most important first: the kernel keeps only the first 127
# characters of clearcpuid= (a 128-byte buffer) and silently drops the rest.
# cx16: cmpxchg16b; smap: clac/stac; popcnt; ssse3: blake2s_compress_ssse3 (SSE movd);
# then VEX (AVX, BMI) users and instructions the emulator lacks.
CLEARCPUID_FEATURES = (
    "cx16", "smap", "popcnt", "ssse3", "sse4_2", "avx", "avx2", "avx512f", "bmi1", "bmi2",
    "fsgsbase", "rdrand", "rdseed", "pku", "invpcid", "clflushopt", "rdpid", "movbe",
)  # fmt: skip
CLEARCPUID_MAX = 127

KVM_INTERNAL_ERROR_EMULATION = 1
BP_VECTOR = 3
GP_VECTOR = 13
MXCSR_DEFAULT_MASK = 0xFFBF  # when the CPU reports none (FXSAVE's MXCSR_MASK = 0)
MAX_INSTRUCTION = 15
CR0_PG = 1 << 31
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

# Register numbers as ModRM/SIB encode them (with REX.B/X/R as bit 3).
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip

# How often each assist ran in this process (for diagnostics and benchmarks).
assist_counts: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def clearcpuid_value(features=CLEARCPUID_FEATURES, limit: int = CLEARCPUID_MAX) -> str:
    """Comma-joined features, as many whole ones as fit in ``limit`` characters."""
    out = ""
    for feature in features:
        candidate = f"{out},{feature}" if out else feature
        if len(candidate) > limit:
            break
        out = candidate
    return out


def _option_key(token: str) -> str:
    return token.split("=", 1)[0]


def pvm_cmdline(base: str) -> str:
    """``base`` plus the options a Linux guest needs on a PVM host.

    Options whose key ``base`` already sets are left as the caller wrote them
    (``mitigations=auto`` in ``base`` wins over ours).  Words after ``--`` belong to
    init, so ours go before it.
    """
    tokens = base.split()
    cut = tokens.index("--") if "--" in tokens else len(tokens)
    head, init_args = tokens[:cut], tokens[cut:]
    keys = {_option_key(t) for t in head}
    extra = [opt for opt in PVM_CMDLINE_OPTIONS if _option_key(opt) not in keys]
    if "clearcpuid" not in keys:
        extra.append("clearcpuid=" + clearcpuid_value())
    return " ".join(head + extra + init_args)


# --------------------------------------------------------------------------------------
# Decoding ldmxcsr / stmxcsr
# --------------------------------------------------------------------------------------
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
    store: bool  # True: stmxcsr m32 (MXCSR -> memory); False: ldmxcsr m32
    length: int  # bytes, prefixes included
    operand: MemOperand
    vex: bool = False  # vldmxcsr / vstmxcsr

    @property
    def mnemonic(self) -> str:
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


# --------------------------------------------------------------------------------------
# Guest memory through the vCPU's page tables
# --------------------------------------------------------------------------------------
def _translate(memory, sregs, va: int) -> int:
    if not sregs.cr0 & CR0_PG:
        return va
    from vmm.kernel.translate import walk

    return walk(memory, sregs.cr3, va, la57=bool(sregs.cr4 & CR4_LA57))


def _pieces(memory, sregs, va: int, n: int) -> list[tuple[int, int]]:
    """[(gpa, length)] covering n bytes at va, split at page boundaries."""
    out = []
    while n:
        chunk = min(n, 0x1000 - (va & 0xFFF))
        out.append((_translate(memory, sregs, va), chunk))
        va = (va + chunk) & MASK64
        n -= chunk
    return out


def read_virtual(memory, sregs, va: int, n: int) -> bytes:
    return b"".join(memory.read(gpa, k) for gpa, k in _pieces(memory, sregs, va, n))


def write_virtual(memory, sregs, va: int, data: bytes) -> None:
    pieces = _pieces(memory, sregs, va, len(data))  # translate all before writing any
    off = 0
    for gpa, k in pieces:
        memory.write(gpa, data[off : off + k])
        off += k


def read_code(memory, sregs, rip: int, n: int = MAX_INSTRUCTION) -> bytes:
    """Up to n bytes at rip, stopping at an unmapped page or the end of RAM."""
    out = b""
    while len(out) < n:
        va = (rip + len(out)) & MASK64
        chunk = min(n - len(out), 0x1000 - (va & 0xFFF))
        try:
            out += read_virtual(memory, sregs, va, chunk)
        except VmmError:
            break
    return out


# --------------------------------------------------------------------------------------
# The assists
# --------------------------------------------------------------------------------------
# MXCSR goes through KVM_GET_XSAVE/KVM_SET_XSAVE (Vcpu.get_xsave/set_xsave):
# KVM_GET_FPU/KVM_SET_FPU ignore the mxcsr field (it reads 0 and writes are dropped),
# so the legacy FXSAVE area of the XSAVE buffer is the only way in.
XSAVE_MXCSR = 24  # offsets in the legacy (FXSAVE) region
XSAVE_MXCSR_MASK = 28
XSAVE_XSTATE_BV = 512
XFEATURE_SSE = 1 << 1  # KVM takes MXCSR from the buffer only when FP or SSE is set


def get_mxcsr(vcpu) -> tuple[int, int]:
    """(MXCSR, MXCSR_MASK) of a vCPU that is not running."""
    buf = vcpu.get_xsave()
    mxcsr, mask = struct.unpack_from("<II", buf, XSAVE_MXCSR)
    return mxcsr, mask or MXCSR_DEFAULT_MASK


def set_mxcsr(vcpu, value: int) -> None:
    buf = vcpu.get_xsave()
    struct.pack_into("<I", buf, XSAVE_MXCSR, value)
    (xstate_bv,) = struct.unpack_from("<Q", buf, XSAVE_XSTATE_BV)
    struct.pack_into("<Q", buf, XSAVE_XSTATE_BV, xstate_bv | XFEATURE_SSE)
    vcpu.set_xsave(buf)


def _inject_exception(vcpu, vector: int, error_code: int | None = None) -> None:
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.pending = 0
    events.exception.nr = vector
    events.exception.has_error_code = 0 if error_code is None else 1
    events.exception.error_code = error_code or 0
    vcpu.set_vcpu_events(events)


def _is_emulation_failure(vcpu) -> bool:
    run = getattr(vcpu, "run", None)
    if run is None:
        return True  # no kvm_run to ask: the caller says it was an internal error
    try:
        return int(run.internal.suberror) == KVM_INTERNAL_ERROR_EMULATION
    except (AttributeError, TypeError):
        return True


def assist_internal_error(vcpu, memory) -> bool:
    """Perform the instruction the host could not emulate; True when the guest may go on.

    Called on KVM_EXIT_INTERNAL_ERROR.  Handles suberror 1 (emulation failure) at:
    ``int3`` (RIP += 1, inject #BP, exactly what the CPU does for the trap) and
    ``ldmxcsr``/``stmxcsr`` (MXCSR via KVM_GET_XSAVE/KVM_SET_XSAVE, RIP past the
    instruction; reserved bits in a loaded value inject #GP(0) like the CPU).
    Anything else, or an operand that cannot be translated (a real CPU would raise
    #PF there): False, and the caller reports the failure.
    """
    if not _is_emulation_failure(vcpu):
        return False
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except VmmError:
        return False
    code = read_code(memory, sregs, regs.rip)
    if not code:
        return False
    if code[0] == 0xCC or code[:2] == b"\xcd\x03":  # int3 / int $3
        length = 1 if code[0] == 0xCC else 2
        regs.rip = (regs.rip + length) & MASK64  # #BP is a trap: it reports the next RIP
        vcpu.set_regs(regs)
        _inject_exception(vcpu, BP_VECTOR)
        assist_counts["int3"] += 1
        return True
    insn = decode_mxcsr(code)
    if insn is None or not sregs.efer & EFER_LMA or not sregs.cs.l:
        return False  # the decoder speaks 64-bit mode only
    next_rip = (regs.rip + insn.length) & MASK64
    addr = effective_address(insn.operand, regs, next_rip, sregs.fs.base, sregs.gs.base)
    try:
        mxcsr, valid_mask = get_mxcsr(vcpu)
        if insn.store:
            write_virtual(memory, sregs, addr, struct.pack("<I", mxcsr))
        else:
            (value,) = struct.unpack("<I", read_virtual(memory, sregs, addr, 4))
            if value & ~valid_mask:
                _inject_exception(vcpu, GP_VECTOR, 0)  # what the CPU does: RIP stays
                assist_counts[f"{insn.mnemonic}#GP"] += 1
                return True
            set_mxcsr(vcpu, value)
    except VmmError:  # TranslationError, GuestMemoryError, KvmIoctlError
        return False
    regs.rip = next_rip
    vcpu.set_regs(regs)
    assist_counts[insn.mnemonic] += 1
    return True


# --------------------------------------------------------------------------------------
# Explaining a failure
# --------------------------------------------------------------------------------------
def identify(code: bytes) -> tuple[str, str | None]:
    """(what the bytes look like, a hint to avoid it) for the usual emulator failures."""
    insn = decode_mxcsr(code)
    if insn is not None:
        return f"{insn.mnemonic} {insn.operand.describe()}", None
    i = 0
    while i < len(code) and code[i] in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3):
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
    code = read_code(memory, sregs, regs.rip)
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
