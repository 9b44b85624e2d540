/*
 * Linked like vmlinux: virtual addresses from 0xffffffff81000000, loaded at physical
 * 16 MiB, ELF entry = physical address of the 64-bit entry. Preprocessed with cpp.
 * PERCPU_VA0 selects the Linux 6.12 style (section-relative .data..percpu at VA 0).
 */
#include "layout.h"

OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
ENTRY(phys_startup_64)

PHDRS {
	text PT_LOAD FLAGS(7);
#ifdef PERCPU_VA0
	percpu PT_LOAD FLAGS(6);
	rest PT_LOAD FLAGS(7);
#endif
	note PT_NOTE FLAGS(4);
}

SECTIONS {
	. = KERNEL_VA_BASE;
	_text = .;
	.text : AT(ADDR(.text) - START_KERNEL_MAP) {
		*(.head.text)
		*(.text .text.*)
	} :text
	_etext = .;

	.rodata : AT(ADDR(.rodata) - START_KERNEL_MAP) {
		*(.rodata .rodata.*)
	} :text

	.notes : AT(ADDR(.notes) - START_KERNEL_MAP) {
		*(.note.Xen)
	} :text :note

#ifdef PERCPU_VA0
	/* Linux 6.12: per-CPU symbols are offsets from 0, the template lives in the image. */
	. = ALIGN(4096);
	__per_cpu_load = .;
	.data..percpu 0 : AT(__per_cpu_load - START_KERNEL_MAP) {
		__per_cpu_start = .;
		*(.data..percpu)
		__per_cpu_end = .;
	} :percpu
	. = __per_cpu_load + SIZEOF(.data..percpu);
#define REST :rest
#else
	/* Linux 7.x: per-CPU symbols have their absolute template addresses. */
	. = ALIGN(4096);
	.data..percpu : AT(ADDR(.data..percpu) - START_KERNEL_MAP) {
		__per_cpu_load = .;
		__per_cpu_start = .;
		*(.data..percpu)
		__per_cpu_end = .;
	} :text
#define REST :text
#endif
	/* Placed after .data..percpu so that ".data.*" below cannot swallow it. */
	.data : AT(ADDR(.data) - START_KERNEL_MAP) {
		. = ALIGN(4096);
		*(.data..page_aligned)
		*(.data .data.*)
	} REST

	.bss : AT(ADDR(.bss) - START_KERNEL_MAP) {
		. = ALIGN(4096);
		__bss_start = .;
		*(.bss .bss.*) *(COMMON)
		. = ALIGN(8);
		__bss_end = .;
	} REST
	_end = .;

	phys_startup_64 = ABSOLUTE(startup_64 - START_KERNEL_MAP);

	/DISCARD/ : { *(.eh_frame) *(.note.GNU-stack) *(.comment) *(.note.gnu.property) }
}
