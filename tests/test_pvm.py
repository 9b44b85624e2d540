"""PVM-host assists without a VM: command line, the ldmxcsr/stmxcsr decoder (vmm.arch.x86.decode),
identify()."""

import shutil
import subprocess
from types import SimpleNamespace

import pytest

from vmm.machine import pvm
from vmm.arch.x86.decode import GPR_NAMES, MemOperand, decode_mxcsr, effective_address

# --- command line -----------------------------------------------------------------------


def test_cmdline_appends_every_option_once():
    line = pvm.pvm_cmdline("console=ttyS0 reboot=k panic=-1")
    tokens = line.split()
    assert tokens[:3] == ["console=ttyS0", "reboot=k", "panic=-1"]
    for opt in pvm.PVM_CMDLINE_OPTIONS:
        assert tokens.count(opt) == 1
    assert pvm.pvm_cmdline(line) == line  # idempotent


def test_cmdline_respects_caller_options():
    line = pvm.pvm_cmdline("console=ttyS0 mitigations=auto clearcpuid=avx lpj=1")
    assert "mitigations=off" not in line and "mitigations=auto" in line
    assert line.count("clearcpuid=") == 1 and "clearcpuid=avx" in line
    assert "lpj=5000000" not in line


def test_cmdline_keeps_init_arguments_last():
    line = pvm.pvm_cmdline("console=ttyS0 -- version cmdline")
    assert line.endswith(" -- version cmdline")
    assert "noxsave" in line.split(" -- ")[0]
    assert pvm.pvm_cmdline("-- x").endswith(" -- x") and pvm.pvm_cmdline("-- x").startswith("noxsave")
    assert pvm.pvm_cmdline("").startswith("noxsave ")


def test_clearcpuid_fits_the_kernel_buffer_most_important_first():
    value = pvm.clearcpuid_value()
    assert len(value) <= 127
    features = value.split(",")
    assert features[:4] == ["cx16", "smap", "popcnt", "ssse3"]
    # whole features only, even when the limit cuts in the middle of one
    assert pvm.clearcpuid_value(("aaaa", "bbbb", "cccc"), limit=10) == "aaaa,bbbb"
    line = pvm.pvm_cmdline("")
    assert len(line.split("clearcpuid=")[1].split()[0]) <= 127


# --- decoder: encodings assembled with GNU as ---------------------------------------------
R = {name: i for i, name in enumerate(GPR_NAMES)}

CASES = [
    # bytes, store, length, operand
    ("0f ae 10", False, 3, MemOperand(R["rax"], None, 1, 0)),
    ("0f ae 1c 24", True, 4, MemOperand(R["rsp"], None, 1, 0)),
    ("0f ae 55 08", False, 4, MemOperand(R["rbp"], None, 1, 8)),
    ("41 0f ae 54 24 80", False, 6, MemOperand(R["r12"], None, 1, -0x80)),
    ("41 0f ae 9d 45 23 01 00", True, 8, MemOperand(R["r13"], None, 1, 0x12345)),
    ("41 0f ae 55 00", False, 5, MemOperand(R["r13"], None, 1, 0)),
    ("0f ae 15 10 00 00 00", False, 7, MemOperand(None, None, 1, 0x10, rip_relative=True)),
    ("0f ae 14 98", False, 4, MemOperand(R["rax"], R["rbx"], 4, 0)),
    ("43 0f ae 5c f8 7f", True, 6, MemOperand(R["r8"], R["r15"], 8, 0x7F)),
    ("0f ae 14 4d 00 10 00 00", False, 8, MemOperand(None, R["rcx"], 2, 0x1000)),
    ("0f ae 14 25 00 10 00 00", False, 8, MemOperand(None, None, 1, 0x1000)),
    ("65 0f ae 1c 25 18 00 00 00", True, 9, MemOperand(None, None, 1, 0x18, segment="gs")),
    ("64 0f ae 17", False, 4, MemOperand(R["rdi"], None, 1, 0, segment="fs")),
    ("67 0f ae 10", False, 4, MemOperand(R["rax"], None, 1, 0, addr32=True)),
    ("67 42 0f ae 14 4c", False, 6, MemOperand(R["rsp"], R["r9"], 2, 0, addr32=True)),
    ("c5 f8 ae 12", False, 4, MemOperand(R["rdx"], None, 1, 0)),
    ("c4 c1 78 ae 5b 04", True, 6, MemOperand(R["r11"], None, 1, 4)),
    ("c4 a1 78 ae 14 10", False, 6, MemOperand(R["rax"], R["r10"], 1, 0)),
]


@pytest.mark.parametrize("hexbytes,store,length,operand", CASES)
def test_decode_known_encodings(hexbytes, store, length, operand):
    code = bytes.fromhex(hexbytes)
    insn = decode_mxcsr(code + b"\x90" * 8)  # trailing bytes must not be consumed
    assert insn is not None
    assert (insn.store, insn.length, insn.operand) == (store, length, operand)
    assert insn.vex == (code[0] in (0xC4, 0xC5))


@pytest.mark.parametrize(
    "hexbytes",
    [
        "",  # nothing
        "0f",  # truncated opcode
        "0f ae",  # no ModRM
        "0f ae 14",  # SIB missing
        "0f ae 55",  # disp8 missing
        "0f ae 15 10 00 00",  # disp32 short
        "0f ae d0",  # mod 3: not a memory operand
        "0f ae 38",  # clflush (/7)
        "0f ae 20",  # xsave (/4)
        "0f ae 28",  # xrstor (/5)
        "66 0f ae 38",  # clflushopt
        "f3 0f ae 10",  # mandatory prefix: another instruction
        "f0 0f ae 10",  # lock
        "48 90",  # not 0f ae
        "c5 f9 ae 10",  # VEX with pp=01
        "c5 fc ae 10",  # VEX.L=1
        "c4 e2 78 ae 10",  # VEX map 0f38
        "cc",
    ],
)
def test_decode_rejects(hexbytes):
    assert decode_mxcsr(bytes.fromhex(hexbytes)) is None


def test_decode_ignores_rex_w_and_segment_prefixes():
    insn = decode_mxcsr(bytes.fromhex("2e 48 0f ae 10"))
    assert insn is not None and insn.length == 5 and insn.operand.segment is None


REGS = SimpleNamespace(**{name: 0x1000_0000 * (i + 1) + 0x11 * i for i, name in enumerate(GPR_NAMES)})


def test_effective_address_forms():
    rip = 0xFFFFFFFF81000000
    assert effective_address(MemOperand(R["rax"], R["rbx"], 4, -8), REGS, rip) == REGS.rax + 4 * REGS.rbx - 8
    assert effective_address(MemOperand(None, None, 1, -0x10, rip_relative=True), REGS, rip) == rip - 0x10
    assert effective_address(MemOperand(None, None, 1, 0x18, segment="gs"), REGS, rip, gs_base=0xFFFF888000000000) \
        == 0xFFFF888000000018
    regs = SimpleNamespace(**{n: 0 for n in GPR_NAMES})
    regs.rax = 0xFFFF_FFFF_FFFF_FFF0
    assert effective_address(MemOperand(R["rax"], None, 1, 0x20), regs, 0) == 0x10  # wraps at 64 bits
    assert effective_address(MemOperand(R["rax"], None, 1, 0x20, addr32=True), regs, 0) == 0x10


def _as_matrix():
    """(source line, expected effective address) for every base x index x scale x disp."""
    bases = [n for n in GPR_NAMES] + [None]
    indexes = [None] + [n for n in GPR_NAMES if n != "rsp"]
    disps = [0, 8, -0x80, 0x7F, 0x12345, -0x12345678]
    lines = []
    for b_i, base in enumerate(bases):
        for x_i, index in enumerate(indexes):
            if base is None and index is None:
                continue
            if (b_i + x_i) % 3:  # a third of the pairs keeps the test quick but covers all regs
                continue
            for scale in (1, 2, 4, 8):
                if index is None and scale != 1:
                    continue
                for disp in disps:
                    mnemonic = "stmxcsr" if (b_i + scale) % 2 else "ldmxcsr"
                    reg_part = f"%{base}" if base else ""
                    if index:
                        reg_part += f",%{index},{scale}"
                    ea = disp + (getattr(REGS, base) if base else 0)
                    ea += getattr(REGS, index) * scale if index else 0
                    lines.append((f"{mnemonic} {disp}({reg_part})", mnemonic == "stmxcsr",
                                  ea & ((1 << 64) - 1)))  # fmt: skip
    for disp in (0, -0x40, 0x1234):
        lines.append((f"ldmxcsr {disp}(%rip)", False, None))
    return lines


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                    reason="GNU as/objcopy (binutils) not installed")  # fmt: skip
def test_decoder_against_gnu_as(tmp_path):
    """Hundreds of encodings from the assembler decode back-to-back to the right address."""
    matrix = _as_matrix()
    src = tmp_path / "m.s"
    src.write_text(".text\n" + "\n".join(line for line, _, _ in matrix) + "\n")
    subprocess.run(["as", "--64", "-o", str(tmp_path / "m.o"), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "m.o"), str(tmp_path / "m.bin")],
                   check=True)  # fmt: skip
    code = (tmp_path / "m.bin").read_bytes()
    off = 0
    for line, store, expected in matrix:
        insn = decode_mxcsr(code[off : off + 15])
        assert insn is not None, f"{line}: {code[off:off + 15].hex(' ')}"
        assert insn.store == store, line
        next_rip = 0xFFFFFFFF81000000 + off + insn.length
        ea = effective_address(insn.operand, REGS, next_rip)
        if expected is None:  # rip-relative
            expected = next_rip + int(line.split()[1].split("(")[0], 0)
        assert ea == expected & ((1 << 64) - 1), line
        off += insn.length
    assert off == len(code)


# --- identify / hints ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "hexbytes,name,hint",
    [
        ("cc", "int3", None),
        ("cd 80", "int $0x80", None),
        ("0f 01 ca", "clac", "smap"),
        ("0f 01 cb", "stac", "smap"),
        ("f3 48 0f b8 c7", "popcnt", "popcnt"),
        ("f0 48 0f c7 0e", "cmpxchg16b", "cx16"),
        ("0f ae 27", "xsave", "noxsave"),
        ("48 0f ae 2f", "xrstor", "noxsave"),
        ("c4 e2 f9 f7 c0", "VEX", "avx"),
        ("0f c7 f0", "rdrand", "rdrand"),
        ("66 0f 38 00 c1", "SSSE3", "ssse3"),
        ("0f ae 55 08", "ldmxcsr [rbp+0x8]", None),
        ("0f 0b", "cannot emulate", None),
    ],
)
def test_identify(hexbytes, name, hint):
    what, got_hint = pvm.identify(bytes.fromhex(hexbytes))
    assert name in what
    if hint is None:
        assert got_hint is None
    else:
        assert hint in got_hint


# --- robustness ---------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PREFIXES = st.lists(st.sampled_from([0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x67, 0x40, 0x41, 0x48, 0x4F]), max_size=4)


@settings(max_examples=400, deadline=None)
@given(prefix=PREFIXES, tail=st.binary(max_size=14))
def test_decoder_never_raises_and_stays_in_bounds(prefix, tail):
    code = bytes(prefix) + b"\x0f\xae" + tail
    for blob in (code, tail):
        insn = decode_mxcsr(blob)
        if insn is not None:
            assert 3 <= insn.length <= min(len(blob), 15)
            assert insn.operand.scale in (1, 2, 4, 8)
            effective_address(insn.operand, REGS, 0)
        what, hint = pvm.identify(blob)
        assert isinstance(what, str)
