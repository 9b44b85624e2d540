"""The PVM assists against a fake vCPU (the AssistVcpu protocol) and in-process memory.

No KVM here: the fake holds regs, sregs, events and an XSAVE area as plain objects,
so every branch of assist_internal_error is exercised on any host. The same assists
on real KVM with a ring-0 guest: tests/test_pvm_assist.py.
"""

import struct
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent / "data"))
from kfixture import FakeMemory  # noqa: E402

from vmm.arch.x86.decode import GPR_NAMES  # noqa: E402
from vmm.arch.x86.paging import PTE_PRESENT, PTE_PS  # noqa: E402
from vmm.arch.x86.regs import BP_VECTOR, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, GP_VECTOR  # noqa: E402
from vmm.errors import KvmIoctlError  # noqa: E402
from vmm.machine import pvm  # noqa: E402
from vmm.machine.diagnose import describe_vcpu  # noqa: E402
from vmm.machine.pvm import assists  # noqa: E402

TEXT_VA = 0xFFFFFFFF81000000
TEXT_GPA = 0x200000  # one 2 MiB page maps [TEXT_VA, TEXT_VA + 2 MiB)
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
RW = PTE_PRESENT | 2


class FakeVcpu:
    """A stopped vCPU in 64-bit mode with paging on; records what the assist set."""

    def __init__(self, rip=TEXT_VA, suberror=1):
        self.index = 0
        self.regs = SimpleNamespace(rip=rip, **{n: 0 for n in GPR_NAMES})
        self.sregs = SimpleNamespace(cr0=CR0_PE | CR0_PG, cr3=PML4, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
                                     cs=SimpleNamespace(l=1), fs=SimpleNamespace(base=0),
                                     gs=SimpleNamespace(base=0))  # fmt: skip
        self.events = SimpleNamespace(exception=SimpleNamespace(injected=0, pending=0, nr=0,
                                                                has_error_code=0, error_code=0))  # fmt: skip
        self.xsave = bytearray(4096)
        struct.pack_into("<II", self.xsave, assists.XSAVE_MXCSR, 0x1F80, 0xFFFF)
        self.run = SimpleNamespace(internal=SimpleNamespace(suberror=suberror))
        self.set_regs_calls = 0
        self.fail_get = False

    def get_regs(self):
        if self.fail_get:
            raise KvmIoctlError("KVM_GET_REGS", 5)
        return SimpleNamespace(**vars(self.regs))

    def set_regs(self, regs):
        self.regs = regs
        self.set_regs_calls += 1

    def get_sregs(self):
        return self.sregs

    def get_vcpu_events(self):
        return self.events

    def set_vcpu_events(self, events):
        self.events = events

    def get_xsave(self):
        return bytearray(self.xsave)

    def set_xsave(self, data):
        assert len(data) == 4096
        self.xsave = bytearray(data)

    @property
    def mxcsr(self):
        return struct.unpack_from("<I", self.xsave, assists.XSAVE_MXCSR)[0]


def guest(code: bytes, **regs):
    """Memory with the kernel-text mapping and ``code`` at TEXT_VA; a vCPU stopped on it."""
    mem = FakeMemory()
    mem.write_u64(PML4 + 511 * 8, PDPT | RW)
    mem.write_u64(PDPT + 510 * 8, PD | RW)
    mem.write_u64(PD + 8 * 8, TEXT_GPA | RW | PTE_PS)
    mem.write(TEXT_GPA, code)
    vcpu = FakeVcpu()
    for name, value in regs.items():
        setattr(vcpu.regs, name, value)
    return vcpu, mem


def counted(name):
    return pvm.assist_counts[name]


def test_real_vcpu_has_the_protocol():
    from vmm.kvm import Vcpu

    for method in ("get_regs", "set_regs", "get_sregs", "get_vcpu_events", "set_vcpu_events",
                   "get_xsave", "set_xsave"):  # fmt: skip
        assert callable(getattr(Vcpu, method)), method


def test_int3_advances_rip_and_injects_bp():
    vcpu, mem = guest(b"\xcc\x90")
    before = counted("int3")
    assert pvm.assist_internal_error(vcpu, mem) is True
    assert vcpu.regs.rip == TEXT_VA + 1
    e = vcpu.events.exception
    assert (e.injected, e.pending, e.nr, e.has_error_code) == (1, 0, BP_VECTOR, 0)
    assert counted("int3") == before + 1


def test_int_3_two_byte_form():
    vcpu, mem = guest(b"\xcd\x03")
    assert pvm.assist_internal_error(vcpu, mem) is True
    assert vcpu.regs.rip == TEXT_VA + 2 and vcpu.events.exception.nr == BP_VECTOR


def test_ldmxcsr_rip_relative_loads_mxcsr():
    code = bytes.fromhex("0f ae 15 10 00 00 00")  # ldmxcsr 0x10(%rip)
    vcpu, mem = guest(code)
    mem.write(TEXT_GPA + 7 + 0x10, struct.pack("<I", 0x9FC0))
    before = counted("ldmxcsr")
    assert pvm.assist_internal_error(vcpu, mem) is True
    assert vcpu.mxcsr == 0x9FC0 and vcpu.regs.rip == TEXT_VA + 7
    (xstate_bv,) = struct.unpack_from("<Q", vcpu.xsave, assists.XSAVE_XSTATE_BV)
    assert xstate_bv & assists.XFEATURE_SSE
    assert vcpu.events.exception.injected == 0
    assert counted("ldmxcsr") == before + 1


def test_stmxcsr_stores_through_the_page_tables():
    code = bytes.fromhex("0f ae 58 08")  # stmxcsr 8(%rax)
    vcpu, mem = guest(code, rax=TEXT_VA + 0x100)
    assert pvm.assist_internal_error(vcpu, mem) is True
    assert mem.read(TEXT_GPA + 0x108, 4) == struct.pack("<I", 0x1F80)
    assert vcpu.regs.rip == TEXT_VA + 4


def test_ldmxcsr_reserved_bit_injects_gp_and_keeps_rip():
    vcpu, mem = guest(bytes.fromhex("0f ae 10"), rax=TEXT_VA + 0x200)  # ldmxcsr (%rax)
    mem.write(TEXT_GPA + 0x200, struct.pack("<I", 0x19FC0))
    before = counted("ldmxcsr#GP")
    assert pvm.assist_internal_error(vcpu, mem) is True
    e = vcpu.events.exception
    assert (e.injected, e.nr, e.has_error_code, e.error_code) == (1, GP_VECTOR, 1, 0)
    assert vcpu.regs.rip == TEXT_VA and vcpu.set_regs_calls == 0 and vcpu.mxcsr == 0x1F80
    assert counted("ldmxcsr#GP") == before + 1


def test_refusals_leave_the_vcpu_alone():
    cases = []
    vcpu, mem = guest(b"\xcc")
    vcpu.run.internal.suberror = 2  # not an emulation failure
    cases.append((vcpu, mem))
    cases.append(guest(bytes.fromhex("0f 0b")))  # ud2: nothing to assist
    cases.append(guest(bytes.fromhex("0f ae 10"), rax=0x7FFF_0000_0000))  # operand unmapped
    vcpu, mem = guest(bytes.fromhex("0f ae 10"), rax=TEXT_VA)
    vcpu.sregs.efer = 0  # not long mode: the decoder speaks 64-bit mode only
    cases.append((vcpu, mem))
    vcpu, mem = guest(b"\xcc")
    vcpu.fail_get = True  # registers unavailable
    cases.append((vcpu, mem))
    cases.append((FakeVcpu(rip=TEXT_VA), FakeMemory()))  # RIP not mapped: no bytes
    for vcpu, mem in cases:
        assert pvm.assist_internal_error(vcpu, mem) is False
        assert vcpu.set_regs_calls == 0 and vcpu.events.exception.injected == 0
        assert vcpu.mxcsr == 0x1F80


def test_describe_failure_names_instruction_symbol_and_hint():
    vcpu, mem = guest(bytes.fromhex("0f 01 cb 90"))  # stac
    text = pvm.describe_failure(vcpu, mem, symbols=lambda a: f"fn+{a - TEXT_VA:#x}")
    assert text.startswith(f"vCPU 0 RIP {TEXT_VA:#x} (fn+0x0): bytes 0f 01 cb 90")
    assert "= stac; add smap to clearcpuid=" in text
    vcpu.fail_get = True
    assert "registers unavailable" in pvm.describe_failure(vcpu, mem)


def test_describe_vcpu_reads_the_bytes_at_rip():
    vcpu, mem = guest(bytes(range(1, 17)) + b"\xff" * 8)
    text = describe_vcpu(vcpu, mem, lambda a: "here")
    assert f"RIP {TEXT_VA:#x} (here), bytes " + bytes(range(1, 17)).hex(" ") + ", CR3 0x1000" in text
    vcpu, mem = FakeVcpu(), FakeMemory()
    assert "bytes unreadable" in describe_vcpu(vcpu, mem)
