"""Why a vCPU died: its RIP, the instruction bytes there and the nearest kernel symbol.

Used when KVM reports an internal error (an instruction the host could not emulate):
the bytes at RIP usually name the culprit at a glance (0f ae /2 ldmxcsr, c4/c5 VEX...).
They are read as the vCPU sees them (vmm.arch.x86.paging.read_code), stopping at a page
that is not mapped or not RAM.
"""

from __future__ import annotations

from vmm.arch.x86.paging import read_code
from vmm.errors import VmmError

INSTRUCTION_BYTES = 16


def describe_vcpu(vcpu, memory, symbolize=None) -> str:
    """"vCPU 0 RIP 0x... (func+0x12), bytes 0f ae 10 ..." from the vCPU's own registers."""
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except VmmError as e:
        return f"vCPU {vcpu.index}: registers unavailable ({e})"
    rip = regs.rip
    text = f"vCPU {vcpu.index} RIP {rip:#x}"
    if symbolize is not None:
        name = symbolize(rip)
        if name:
            text += f" ({name})"
    code = read_code(memory, sregs, rip, INSTRUCTION_BYTES)
    text += ", bytes " + (code.hex(" ") if code else "unreadable")
    text += f", CR3 {sregs.cr3:#x}, RSP {regs.rsp:#x}"
    return text
