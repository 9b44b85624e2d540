/*
 * Per-CPU areas like Linux: the .data..percpu template is copied once per CPU at boot,
 * and CPU n's copy of a per-CPU variable lives at &var + __per_cpu_offset[n].
 */
#include "sched.h"

#define DEFINE_PER_CPU_SECTION __attribute__((section(".data..percpu"), aligned(64)))

struct rq runqueues DEFINE_PER_CPU_SECTION = {
	.scx = {
		.flags = SCX_RQ_INITIAL_FLAGS,
		.nr_immed = NR_IMMED_SENTINEL,
		.clock = 0,
		.cpuperf_target = 1024,
	},
	.online = 1,
};

unsigned long __per_cpu_offset[NR_CPUS];
/* Like Linux: physical minus link-time load address; the image is never moved. */
unsigned long phys_base;
unsigned int nr_cpu_ids = 1;
volatile unsigned long jiffies;
enum scx_rq_flags scx_rq_initial_flags = SCX_RQ_INITIAL_FLAGS;

struct uts_namespace init_uts_ns = {
	.name = {
		.sysname = "Linux",
		.nodename = "vmm-guest",
		.release = "0.0.0-vmm-guest",
		.version = "#1",
		.machine = "x86_64",
		.domainname = "(none)",
	},
	.ns_inum = 0xeffffffe,
};

/* 64-byte aligned so value (at +1) is odd and inside one cache line. */
struct misaligned_probe misaligned_probe __attribute__((aligned(64)));
/* Bits 0..15 belong to the guest CPUs, 16..31 to the host (README). */
u32 hot_word __attribute__((aligned(64)));
volatile u32 guest_ready;
volatile u32 guest_done;
volatile u32 guest_command;
volatile u32 guest_command_ack;

extern char __per_cpu_load[], __per_cpu_start[], __per_cpu_end[], _end[];

/* Page-aligned areas, one per CPU the guest runs; the template itself stays untouched. */
#define PERCPU_AREA_SIZE 4096
static u8 percpu_areas[MAX_CPUS][PERCPU_AREA_SIZE] __attribute__((aligned(4096)));
_Static_assert(sizeof(struct rq) <= PERCPU_AREA_SIZE, "per-CPU area too small");
_Static_assert(__builtin_offsetof(struct scx_rq, flags) % 8 == 0, "flags must start a u64 word");
_Static_assert(__builtin_offsetof(struct scx_rq, nr_immed) ==
	       __builtin_offsetof(struct scx_rq, flags) + 4, "nr_immed must follow flags");

/*
 * CPUs that are possible but never run (possible=N > cpus) get their areas in the
 * direct map, like Linux's embedded first chunk: physical RAM right after the image
 * (2 MiB aligned), reached through PAGE_OFFSET. Nobody clears it; each area gets the
 * template copied, which is all the host reads or writes there.
 */
static u8 *spare_area(u32 c, u32 first_spare)
{
	unsigned long phys = ((unsigned long)_end - START_KERNEL_MAP + 0x1fffff) & ~0x1ffffful;
	return (u8 *)(PAGE_OFFSET + phys + (unsigned long)(c - first_spare) * PERCPU_AREA_SIZE);
}

static void copy_template(u8 *dst, size_t size)
{
	/* Word copy: the template is 64-byte aligned and sized (struct rq); ring 0 may be
	 * emulated, and possible=1024 copies it a thousand times. */
	u64 *d = (u64 *)dst;
	const u64 *s = (const u64 *)__per_cpu_load;
	for (size_t i = 0; i < size / 8; i++)
		d[i] = s[i];
	memcpy(dst + size / 8 * 8, __per_cpu_load + size / 8 * 8, size % 8);
}

void percpu_setup(u32 nr_cpus, u32 nr_possible)
{
	size_t size = (size_t)(__per_cpu_end - __per_cpu_start);
	if (size > PERCPU_AREA_SIZE) {
		puts_serial("vmm-guest: .data..percpu larger than a per-CPU area\n");
		guest_exit(EXIT_BAD_CMDLINE);
	}
	for (u32 c = 0; c < nr_possible; c++) {
		u8 *area = c < nr_cpus ? percpu_areas[c] : spare_area(c, nr_cpus);
		copy_template(area, size);
		/* __per_cpu_start is 0 in the VA-0 (6.12) layout, the template VA otherwise. */
		__per_cpu_offset[c] = (unsigned long)area - (unsigned long)__per_cpu_start;
		struct rq *rq = cpu_rq(c);
		rq->cpu = (int)c;
		rq->hot_next = c;
		if (c >= nr_cpus)
			rq->online = 0;
	}
	/* Written once here, before any AP starts, and never again (like Linux's
	 * setup_per_cpu_areas()): the host may resolve per-CPU addresses ahead of a freeze. */
	nr_cpu_ids = nr_possible;
}
