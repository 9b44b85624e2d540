"""Why a vCPU died: its RIP, the instruction bytes there and the nearest kernel symbol.

Used when KVM reports an internal error (an instruction the host could not emulate):
the bytes at RIP usually name the culprit at a glance (0f ae /2 ldmxcsr, c4/c5 VEX...).
"""

from __future__ import annotations

from vmm.errors import VmmError

CR0_PG = 1 << 31
CR4_LA57 = 1 << 12
INSTRUCTION_BYTES = 16


def instruction_gpa(memory, cr0: int, cr3: int, cr4: int, rip: int) -> int:
    """Guest-physical address of `rip`: itself without paging, else by a page walk."""
    if not cr0 & CR0_PG:
        return rip
    from vmm.kernel.translate import walk

    return walk(memory, cr3, rip, la57=bool(cr4 & CR4_LA57))


def read_instruction(memory, cr0: int, cr3: int, cr4: int, rip: int) -> bytes:
    """Up to 16 bytes at rip, stopping at a page that is not mapped or not RAM."""
    out = b""
    addr = rip
    while len(out) < INSTRUCTION_BYTES:
        page_left = 0x1000 - (addr & 0xFFF)
        n = min(page_left, INSTRUCTION_BYTES - len(out))
        try:
            out += memory.read(instruction_gpa(memory, cr0, cr3, cr4, addr), n)
        except VmmError:
            break
        addr += n
    return out


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
    code = read_instruction(memory, sregs.cr0, sregs.cr3, sregs.cr4, rip)
    text += ", bytes " + (code.hex(" ") if code else "unreadable")
    text += f", CR3 {sregs.cr3:#x}, RSP {regs.rsp:#x}"
    return text
