/* IDT, per-CPU TSS (ring-3 -> ring-0 stacks), exception reporting, ring-3 stacks. */
#include "guest.h"

struct idt_entry {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset_mid;
	u32 offset_hi;
	u32 reserved;
} __attribute__((packed));

struct tss64 {
	u32 reserved0;
	u64 rsp0;
	u64 rsp1;
	u64 rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct table_desc {
	u16 limit;
	u64 base;
} __attribute__((packed));

extern u64 gdt[GDT_ENTRIES];
extern const u64 trap_stubs[32];

static struct idt_entry idt[32] __attribute__((aligned(16)));
static struct tss64 tss[MAX_CPUS] __attribute__((aligned(64)));
static u8 kernel_stacks[MAX_CPUS][KSTACK_SIZE] __attribute__((aligned(4096)));
static u8 user_stacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(4096)));

u64 kernel_stack_top(u32 cpu) { return (u64)&kernel_stacks[cpu][KSTACK_SIZE]; }
u64 user_stack_top(u32 cpu) { return (u64)&user_stacks[cpu][USTACK_SIZE]; }

void cpu_tables_init(u32 nr_cpus)
{
	for (u32 v = 0; v < 32; v++) {
		u64 a = trap_stubs[v];
		idt[v] = (struct idt_entry){
			.offset_lo = (u16)a, .selector = BOOT_CS, .ist = 0,
			.type_attr = 0x8e,	/* present, DPL 0, 64-bit interrupt gate */
			.offset_mid = (u16)(a >> 16), .offset_hi = (u32)(a >> 32),
		};
	}
	for (u32 c = 0; c < nr_cpus; c++) {
		u64 base = (u64)&tss[c];
		u64 limit = sizeof(struct tss64) - 1;
		tss[c].rsp0 = kernel_stack_top(c);
		tss[c].iomap_base = sizeof(struct tss64);	/* no bitmap: IOPL 3 decides */
		u32 idx = TSS_SEL(c) / 8;
		gdt[idx] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
			   (0x89ULL << 40) |	/* present, available 64-bit TSS */
			   (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
		gdt[idx + 1] = base >> 32;
	}
}

void cpu_load_tables(u32 cpu)
{
	struct table_desc d = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" :: "m"(d));
	__asm__ volatile("ltr %w0" :: "r"((u16)TSS_SEL(cpu)));
}

static u32 current_cpu_from_tr(void)
{
	u16 tr;
	__asm__ volatile("str %w0" : "=r"(tr));
	return tr >= TSS_SEL(0) ? (u32)(tr - TSS_SEL(0)) / 16 : 0;
}

static const char *const vector_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS",
	"#NP", "#SS", "#GP", "#PF", "rsvd", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

/* trap frame built by head.S trap_common */
enum { F_RDX = 11, F_RAX = 14, F_VECTOR = 15, F_ERROR, F_RIP, F_CS, F_RFLAGS, F_RSP, F_SS };

/*
 * Port I/O from ring 3. With IOPL 3 it runs natively on hardware virtualization, but
 * under PVM guest user mode runs on the host's IOPL and every in/out faults with #GP.
 * Perform the access here and step over it, so ring-3 code is the same on both.
 * Returns false if the instruction is not a port access.
 */
static bool emulate_user_port_io(u64 *frame)
{
	const u8 *ip = (const u8 *)frame[F_RIP];
	u32 len = 0, size = 4;
	if (ip[0] == 0x66) {
		size = 2;
		len = 1;
	}
	u8 op = ip[len++];
	u16 port;
	switch (op) {
	case 0xe4: case 0xe5: case 0xe6: case 0xe7:
		port = ip[len++];
		break;
	case 0xec: case 0xed: case 0xee: case 0xef:
		port = (u16)frame[F_RDX];
		break;
	default:
		return false;
	}
	if (!(op & 1))
		size = 1;
	u64 *rax = &frame[F_RAX];
	if (op & 2) {	/* out */
		if (size == 1)
			outb(port, (u8)*rax);
		else if (size == 2)
			__asm__ volatile("outw %w0, %w1" :: "a"((u16)*rax), "Nd"(port));
		else
			outl(port, (u32)*rax);
	} else {	/* in: 8/16-bit keep the upper bits, 32-bit zero-extends */
		if (size == 1) {
			*rax = (*rax & ~0xffUL) | inb(port);
		} else if (size == 2) {
			u16 v;
			__asm__ volatile("inw %w1, %w0" : "=a"(v) : "Nd"(port));
			*rax = (*rax & ~0xffffUL) | v;
		} else {
			u32 v;
			__asm__ volatile("inl %w1, %0" : "=a"(v) : "Nd"(port));
			*rax = v;
		}
	}
	frame[F_RIP] += len;
	return true;
}

void trap_handler(u64 *frame)
{
	u64 vector = frame[F_VECTOR], error = frame[F_ERROR], rip = frame[F_RIP], cs = frame[F_CS];
	if (vector == 13 && (cs & 3) == 3 && error == 0 && emulate_user_port_io(frame))
		return;
	u64 cr2 = 0;
	u32 cpu = current_cpu_from_tr();
	if (vector == 14)
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	u32 rec[6] = { (u32)vector, (u32)error, (u32)rip, (u32)(rip >> 32), cpu, (u32)cs };
	report(REC_EXCEPTION, rec, 6);
	const char *name = vector < 32 && vector_names[vector] ? vector_names[vector] : "?";
	printf_serial("vmm-guest: exception %d %s error %x at rip %x cs %x cr2 %x cpu %d\n",
		      vector, name, error, rip, cs, cr2, (u64)cpu);
	guest_exit(EXIT_EXCEPTION);
}
