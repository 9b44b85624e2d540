"""The PVM assists on real KVM: a tiny ring-0 guest runs ldmxcsr/stmxcsr and int3.

On a PVM host each of those instructions stops KVM_RUN with an emulation failure
and only our assist lets the guest go on; on a host with VMX/SVM the CPU runs them
and the same checks must hold (the assist is then never called).
"""

import shutil
import subprocess

import pytest

from vmm.machine import pvm

pytestmark = pytest.mark.kvm

MXCSR_VALUE = 0x9FC0  # FTZ | DAZ | all exceptions masked: distinct from the reset 0x1f80
REPORT_PORT = 0x600
EXIT_PORT = 0xF4

# A freestanding guest entered by the 64-bit boot protocol (long mode, ring 0,
# identity-mapped low memory), linked and loaded at physical 16 MiB.
# Reports, in order, through 32-bit outs to port 0x600:
#   MXCSR after ldmxcsr (rip-relative) + stmxcsr, MXCSR stored with a SIB operand,
#   0xB3B3 from the #BP handler and 1 if the trap frame's RIP is the instruction
#   after int3, then 0x0D0D from the #GP handler after an ldmxcsr with a reserved
#   bit set; exit code 42.
GUEST_S = r"""
    .code64
    .text
    .globl _start
_start:
    mov %cr4, %rax
    or $0x600, %rax               /* OSFXSR | OSXMMEXCPT: SSE state usable */
    mov %rax, %cr4
    mov %cr0, %rax
    and $~0x4, %rax               /* EM off */
    or $0x2, %rax                 /* MP on */
    mov %rax, %cr0
    lea stack_top(%rip), %rsp

    /* IDT gates for #BP (3) and #GP (13) */
    lea idt(%rip), %rdi
    lea bp_handler(%rip), %rax
    mov $3, %ecx
    call set_gate
    lea gp_handler(%rip), %rax
    mov $13, %ecx
    call set_gate
    lidt idt_desc(%rip)

    mov $0x600, %dx
    ldmxcsr value(%rip)           /* rip-relative, no prefix */
    stmxcsr out1(%rip)
    mov out1(%rip), %eax
    out %eax, %dx
    lea out2(%rip), %rbx
    mov $1, %rcx
    stmxcsr -4(%rbx,%rcx,4)       /* SIB: base + index*4 + disp8 */
    mov out2(%rip), %eax
    out %eax, %dx

    int3
after_int3:
    ldmxcsr bad(%rip)             /* reserved bit 16: #GP(0) */
    hlt

set_gate:                         /* rdi = idt, ecx = vector, rax = handler */
    shl $4, %rcx
    add %rdi, %rcx
    mov %ax, (%rcx)
    mov %cs, %r8w
    mov %r8w, 2(%rcx)
    movw $0x8e00, 4(%rcx)         /* present, DPL 0, 64-bit interrupt gate */
    shr $16, %rax
    mov %ax, 6(%rcx)
    shr $16, %rax
    mov %eax, 8(%rcx)
    movl $0, 12(%rcx)
    ret

bp_handler:
    mov $0x600, %dx
    mov $0xb3b3, %eax
    out %eax, %dx
    lea after_int3(%rip), %rax
    xor %ecx, %ecx
    cmp (%rsp), %rax              /* the trap frame's RIP */
    sete %cl
    mov %ecx, %eax
    out %eax, %dx
    iretq

gp_handler:
    mov $0x600, %dx
    mov $0x0d0d, %eax
    out %eax, %dx
    mov $42, %al
    out %al, $0xf4
    hlt

    .data
    .balign 16
value: .long 0x9fc0
bad:   .long 0x19fc0
out1:  .long 0
out2:  .long 0
idt_desc:
    .word 16*32-1
    .quad idt
    .balign 16
idt:   .fill 32*16, 1, 0
    .balign 16
stack: .fill 4096, 1, 0
stack_top:
"""


@pytest.fixture(scope="module")
def assist_guest(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (builds the test guest)")
    d = tmp_path_factory.mktemp("pvm-guest")
    (d / "guest.S").write_text(GUEST_S)
    subprocess.run(
        ["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x1000000", "-Wl,--build-id=none",
         "-Wl,-z,noexecstack", "-o", str(d / "guest.elf"), str(d / "guest.S")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "guest.elf"


def test_assists_let_the_guest_run(assist_guest):
    from vmm.kvm import is_pvm_host
    from vmm.runtime import Machine

    before = dict(pvm.assist_counts)
    with Machine(assist_guest, cpus=1, memory="64M", cmdline="", console=None, timeout=60) as m:
        result = m.wait()
    values = [v for _, v in m.reports]
    assert (result.reason, result.exit_code) == ("exit-code", 42), (result, values)
    assert values == [MXCSR_VALUE, MXCSR_VALUE, 0xB3B3, 1, 0x0D0D]
    if is_pvm_host():
        done = {k: pvm.assist_counts[k] - before.get(k, 0) for k in pvm.assist_counts}
        assert done.get("ldmxcsr", 0) >= 1 and done.get("stmxcsr", 0) >= 2
        assert done.get("int3", 0) == 1 and done.get("ldmxcsr#GP", 0) == 1


def test_unassisted_failure_is_described(assist_guest):
    """With assists off, a PVM host stops at the first ldmxcsr; describe_failure names it
    (called on the vCPU thread while the vCPU still exists, as the Machine does)."""
    from vmm.kvm import is_pvm_host
    from vmm.runtime import Machine

    if not is_pvm_host():
        pytest.skip("hardware virtualization runs ldmxcsr natively: nothing to describe")

    class Describing(Machine):
        described = None

        def on_internal_error(self, vcpu):
            self.described = pvm.describe_failure(vcpu, self.memory, symbols=lambda a: f"sym+{a & 0xff:#x}")
            return False

    with Describing(assist_guest, cpus=1, memory="64M", cmdline="", console=None, timeout=60,
                    pvm_assists=False) as m:  # fmt: skip
        result = m.wait()
    assert result.reason == "internal-error"
    text = m.described
    assert text and "0f ae 15" in text and "ldmxcsr [rip" in text and "(sym+" in text, text
