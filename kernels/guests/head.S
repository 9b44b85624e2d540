/*
 * Entry points, early page tables, GDT, exception stubs, the ring-3 switch and the
 * real-mode AP trampoline. Everything that must be assembly lives here; the rest is C.
 *
 * Both boot entries run at PHYSICAL addresses (the image is linked at
 * 0xffffffff81000000 but loaded at 16 MiB): 32-bit code names symbols through pa(),
 * 64-bit code uses RIP-relative addressing, which yields the physical address as long
 * as we execute from the identity map.
 */
#include "layout.h"

#define pa(x) ((x) - START_KERNEL_MAP)
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR4_PAE 0x20

	.section .head.text, "ax"

/* Linux 64-bit boot protocol: long mode, paging with an identity map, RSI = boot_params. */
	.code64
	.globl startup_64
startup_64:
	cli
	cld
	leaq boot_stack_top(%rip), %rsp	/* physical: identity-mapped in both tables */
	xorl %edi, %edi			/* boot_protocol 0: Linux, RSI = zero page */
	jmp common_64

/* PVH (Xen PHYS32_ENTRY): 32-bit protected mode, paging off, EBX = hvm_start_info. */
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	movl %ebx, %esi
	movl $pa(boot_stack_top), %esp	/* PVH gives no stack; lretq below needs one */
	lgdt pa(gdt_desc_phys)
	movl $BOOT_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	ljmp $CODE32_SEL, $pa(1f)
1:	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pa(early_pml4), %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	movl $1, %edi			/* boot_protocol 1: PVH, RSI = hvm_start_info */
	ljmp $BOOT_CS, $pa(common_64)

/* Both protocols: still at the physical address, RDI = protocol, RSI = info pointer. */
	.code64
common_64:
	leaq early_pml4(%rip), %rax	/* our tables: identity 4 GiB + kernel image map */
	movq %rax, %cr3
	lgdt gdt_desc(%rip)		/* base is the high VA, mapped from now on */
	movabsq $high_64, %rax
	pushq $BOOT_CS
	pushq %rax
	lretq
high_64:
	movl $BOOT_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movq %rdi, %r8
	movq %rsi, %r9
	leaq __bss_start(%rip), %rdi	/* a loader need not clear .bss: do it ourselves */
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq
	leaq boot_stack_top(%rip), %rsp
	movq %r8, %rdi
	movq %r9, %rsi
	call boot_main
1:	hlt
	jmp 1b

/* APs arrive here from the trampoline, on the final page tables, EDI = cpu index. */
	.globl ap_entry64
ap_entry64:
	lgdt gdt_desc(%rip)
	leaq 1f(%rip), %rax
	pushq $BOOT_CS
	pushq %rax
	lretq
1:	movl $BOOT_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	call ap_main
1:	hlt
	jmp 1b

/*
 * enter_ring3(fn, arg, user_rsp): iretq to fn(arg) at CPL 3 with IOPL 3 (port I/O
 * allowed) and IF 0. Ring 3 never comes back except through an exception.
 */
	.text
	.globl enter_ring3
enter_ring3:
	pushq $(USER_DS | 3)
	pushq %rdx
	pushq $0x3002
	pushq $(USER_CS | 3)
	pushq %rdi
	movq %rsi, %rdi
	iretq

/* ---- exception stubs: push a dummy error code where the CPU does not ---- */
.macro TRAP_STUB vec
	.balign 16
trap_stub_\vec:
	.if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	pushq $0
	.endif
	pushq $\vec
	jmp trap_common
.endm

	.altmacro
	.set vec, 0
	.rept 32
	TRAP_STUB %vec
	.set vec, vec + 1
	.endr

/* Frame handed to trap_handler: r15..rax, vector, error, rip, cs, rflags, rsp, ss. */
trap_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	movq %rsp, %rbx			/* rbx is saved above: free to hold the frame */
	andq $-16, %rsp
	call trap_handler		/* returns only when the fault was handled */
	movq %rbx, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp			/* vector, error code */
	iretq

	.section .rodata
	.balign 8
	.globl trap_stubs
trap_stubs:
.macro TRAP_PTR vec
	.quad trap_stub_\vec
.endm
	.set vec, 0
	.rept 32
	TRAP_PTR %vec
	.set vec, vec + 1
	.endr
	.noaltmacro

/*
 * Real-mode AP trampoline, copied to AP_TRAMPOLINE_PHYS by the BSP before SIPI.
 * Position-dependent on that address only: every reference is an offset from
 * ap_trampoline_start. The BSP fills the parameter block at its end.
 */
#define T(x) ((x) - ap_trampoline_start)
#define TPHYS(x) (AP_TRAMPOLINE_PHYS + T(x))
	.section .rodata
	.balign 16
	.globl ap_trampoline_start, ap_trampoline_end, ap_tramp_params
ap_trampoline_start:
	.code16
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl T(tramp_gdt_desc)
	movl %cr0, %eax
	orl $CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $CODE32_SEL, $TPHYS(ap_pm32)
	.code32
ap_pm32:
	movl $BOOT_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl TPHYS(tramp_cr3), %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $BOOT_CS, $TPHYS(ap_lm64)
	.code64
ap_lm64:
	movq TPHYS(tramp_stack), %rsp
	movl TPHYS(tramp_cpu), %edi
	movq TPHYS(tramp_entry), %rax
	jmp *%rax
	.balign 8
ap_tramp_params:
tramp_gdt_desc:	.word 0, 0, 0, 0	/* limit, 32-bit physical base of gdt */
tramp_cr3:	.quad 0
tramp_stack:	.quad 0
tramp_entry:	.quad 0
tramp_cpu:	.quad 0
ap_trampoline_end:

/* ---- GDT (TSS descriptors filled in by cpu.c) ---- */
	.data
	.balign 16
	.globl gdt, gdt_desc
gdt:
	.quad 0				/* 0x00 null */
	.quad 0x00cf9b000000ffff	/* 0x08 32-bit code (PVH and AP trampoline) */
	.quad 0x00af9b000000ffff	/* 0x10 __BOOT_CS: 64-bit kernel code */
	.quad 0x00cf93000000ffff	/* 0x18 __BOOT_DS: kernel data */
	.quad 0x00cff3000000ffff	/* 0x20 user data (DPL 3) */
	.quad 0x00affb000000ffff	/* 0x28 user 64-bit code (DPL 3) */
	.fill 2 * MAX_CPUS, 8, 0	/* 0x30 + 16*cpu: 64-bit TSS descriptors */
gdt_end:
	.balign 8
	.word 0, 0, 0
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt
	.balign 8
	.word 0, 0, 0
gdt_desc_phys:
	.word gdt_end - gdt - 1
	.long pa(gdt)

/*
 * Page tables, U/S set everywhere (ring 3 shares all data with ring 0):
 *   identity map of the first 4 GiB (2 MiB pages; the 3-4 GiB MMIO gap uncached),
 *   0xffffffff80000000 -> physical 0 (1 GiB, so the image at 16 MiB is at
 *   0xffffffff81000000), sharing the first identity page directory, and
 *   PAGE_OFFSET (0xffff888000000000, PML4 slot 273) -> physical 0: a direct map of the
 *   first 4 GiB like Linux's (it holds the per-CPU areas of possible-only CPUs).
 */
#define PTE_TABLE 0x7	/* present, writable, user */
#define PDE_2M 0x87	/* present, writable, user, 2 MiB page */
#define PDE_UNCACHED 0x18
	.section .data..page_aligned, "aw"
	.balign 4096
	.globl early_pml4
early_pml4:
	.quad pa(ident_pdpt) + PTE_TABLE
	.fill 272, 8, 0
	.quad pa(ident_pdpt) + PTE_TABLE	/* slot 273: PAGE_OFFSET, the direct map */
	.fill 237, 8, 0
	.quad pa(high_pdpt) + PTE_TABLE
ident_pdpt:
	.quad pa(ident_pd) + PTE_TABLE
	.quad pa(ident_pd) + 0x1000 + PTE_TABLE
	.quad pa(ident_pd) + 0x2000 + PTE_TABLE
	.quad pa(ident_pd) + 0x3000 + PTE_TABLE
	.fill 508, 8, 0
high_pdpt:
	.fill 510, 8, 0
	.quad pa(ident_pd) + PTE_TABLE
	.quad 0
ident_pd:
	.set i, 0
	.rept 2048
	.if i >= 1536
	.quad (i << 21) + PDE_2M + PDE_UNCACHED
	.else
	.quad (i << 21) + PDE_2M
	.endif
	.set i, i + 1
	.endr

/* ---- PVH note: QEMU -kernel enters pvh_start32 ---- */
	.section .note.Xen, "a"
	.balign 4
	.long 4				/* namesz "Xen\0" */
	.long 4				/* descsz */
	.long 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pa(pvh_start32)

	.section .note.GNU-stack, "", @progbits

	.bss
	.balign 4096
boot_stack:
	.skip KSTACK_SIZE
	.globl boot_stack_top
boot_stack_top:
