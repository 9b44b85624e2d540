/* Addresses of the guest image; included by C, assembly and the linker script. */
#ifndef LAYOUT_H
#define LAYOUT_H

#define START_KERNEL_MAP 0xffffffff80000000   /* VA of physical 0 (like Linux __START_KERNEL_map) */
#define PHYS_LOAD_ADDR   0x1000000            /* 16 MiB */
#define KERNEL_VA_BASE   (START_KERNEL_MAP + PHYS_LOAD_ADDR)  /* 0xffffffff81000000 */

#define MAX_CPUS 64         /* CPUs the guest can start (cpus=N, N <= MAX_CPUS; APIC ID = N, flat topology) */
#define NR_CPUS 1024        /* size of __per_cpu_offset[] like CONFIG_NR_CPUS=1024; possible=N <= this */
#define PAGE_OFFSET 0xffff888000000000 /* direct map of physical 0-4 GiB, like Linux's default page_offset_base */

#define AP_TRAMPOLINE_PHYS 0x6000   /* real-mode AP entry page (SIPI vector 0x06) */
#define LAPIC_BASE 0xfee00000

#define BOOT_CS 0x10
#define BOOT_DS 0x18
#define CODE32_SEL 0x08
#define USER_DS 0x20    /* used with RPL 3: 0x23 */
#define USER_CS 0x28    /* used with RPL 3: 0x2b */
#define TSS_SEL(cpu) (0x30 + 16 * (cpu))
#define GDT_ENTRIES (6 + 2 * MAX_CPUS)

#define KSTACK_SIZE 16384   /* ring-0 stack per CPU */
#define USTACK_SIZE 16384   /* ring-3 stack per CPU */

#endif
