"""Control-register, EFER, RFLAGS bits and MSR numbers (Intel SDM vol. 3, AMD APM vol. 2).

The one place in vmm that spells these numbers; everything else imports them.
"""

from __future__ import annotations

MASK32 = (1 << 32) - 1
MASK64 = (1 << 64) - 1

# CR0
CR0_PE = 1 << 0  # protected mode
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31  # paging

# CR4
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_LA57 = 1 << 12  # 5-level paging

# EFER (MSR 0xc0000080)
EFER_SCE = 1 << 0
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active
EFER_NX = 1 << 11

# RFLAGS
RFLAGS_RESERVED = 0x2  # bit 1 always reads as 1
RFLAGS_IF = 1 << 9

# Exception vectors the assists inject
BP_VECTOR = 3  # int3
GP_VECTOR = 13  # general protection

# MSRs
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082  # the 64-bit SYSCALL entry (Linux: entry_SYSCALL_64)
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6
