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

extern char __per_cpu_load[], __per_cpu_start[], __per_cpu_end[];

/* Page-aligned areas, one per possible CPU; the template itself stays untouched. */
#define PERCPU_AREA_SIZE 4096
static u8 percpu_areas[MAX_CPUS][PERCPU_AREA_SIZE] __attribute__((aligned(4096)));
_Static_assert(sizeof(struct rq) <= PERCPU_AREA_SIZE, "per-CPU area too small");
_Static_assert(__builtin_offsetof(struct scx_rq, flags) % 8 == 0, "flags must start a u64 word");
_Static_assert(__builtin_offsetof(struct scx_rq, nr_immed) ==
	       __builtin_offsetof(struct scx_rq, flags) + 4, "nr_immed must follow flags");

void percpu_setup(u32 nr_cpus)
{
	size_t size = (size_t)(__per_cpu_end - __per_cpu_start);
	if (size > PERCPU_AREA_SIZE) {
		puts_serial("vmm-guest: .data..percpu larger than a per-CPU area\n");
		guest_exit(EXIT_BAD_CMDLINE);
	}
	for (u32 c = 0; c < nr_cpus; c++) {
		memcpy(percpu_areas[c], __per_cpu_load, size);
		/* __per_cpu_start is 0 in the VA-0 (6.12) layout, the template VA otherwise. */
		__per_cpu_offset[c] = (unsigned long)percpu_areas[c] - (unsigned long)__per_cpu_start;
		struct rq *rq = cpu_rq(c);
		rq->cpu = (int)c;
		rq->hot_next = c;
	}
	nr_cpu_ids = nr_cpus;
}
