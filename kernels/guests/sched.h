/*
 * Kernel-like data the host inspects through the ELF symbols and BTF: a cut-down
 * struct rq with struct scx_rq, per-CPU like Linux (see README.md for the layout ABI).
 */
#ifndef SCHED_H
#define SCHED_H
#include "guest.h"

/* Same names and values as Linux 6.14+ kernel/sched/ext.h. */
enum scx_rq_flags {
	SCX_RQ_ONLINE = 1 << 0,
	SCX_RQ_CAN_STOP_TICK = 1 << 1,
	SCX_RQ_BAL_PENDING = 1 << 2,
	SCX_RQ_BAL_KEEP = 1 << 3,
	SCX_RQ_BYPASSING = 1 << 4,
	SCX_RQ_CLK_VALID = 1 << 5,
	SCX_RQ_IN_WAKEUP = 1 << 16,
	SCX_RQ_IN_BALANCE = 1 << 17,
};

#define SCX_RQ_INITIAL_FLAGS (SCX_RQ_ONLINE | SCX_RQ_BAL_KEEP)
#define NR_IMMED_SENTINEL 0xa5a5a5a5u

struct list_head {
	struct list_head *next, *prev;
};

struct scx_rq {
	struct list_head local_dsq;	/* stand-in for struct scx_dispatch_q */
	u64 ops_qseq;
	u64 extra_enq_flags;
	u32 nr_running;
	u32 cpuperf_target;
	u32 flags;			/* enum scx_rq_flags bits; 8-byte aligned */
	u32 nr_immed;			/* shares flags' 8-byte word: must never be clobbered */
	u64 clock;			/* valid while flags has SCX_RQ_CLK_VALID */
	unsigned long cpus_to_kick;
	bool cpu_released;
};

struct rq {
	u32 __lock;			/* stand-in for raw_spinlock_t */
	u32 nr_running;
	u64 nr_switches;		/* advanced once per tick of the work loop */
	u64 counter;			/* incremented every work-loop iteration */
	u64 clock;
	struct scx_rq scx;
	int cpu;
	int online;
	/* Observations of the work loop (guest-test fields, not in Linux). */
	u32 obs_flags;			/* scx.flags when CLK_VALID was last seen rising */
	u32 obs_events;			/* how many clear->set transitions of CLK_VALID were seen */
	u64 obs_clock;			/* scx.clock read right after that flags read */
	u64 obs_count;			/* counter at that moment */
	u64 obs_inconsistent;		/* VALID seen with a clock != obs_clock of the same event */
	u64 torn_reads;			/* misaligned_probe.value reads whose bytes differ */
	u64 probe_last;			/* last misaligned_probe.value read */
	u32 hot_next;			/* next hot_word bit this CPU will set (>= 16: all set) */
	u32 cmd_seen;			/* last guest_command value this CPU acted on */
	u32 ring;			/* privilege level the work loop runs at */
	u32 loop_done;			/* 1 once the work loop stopped (loop=N reached or CMD_STOP) */
} __attribute__((aligned(64)));

#define __NEW_UTS_LEN 64
struct new_utsname {
	char sysname[__NEW_UTS_LEN + 1];
	char nodename[__NEW_UTS_LEN + 1];
	char release[__NEW_UTS_LEN + 1];
	char version[__NEW_UTS_LEN + 1];
	char machine[__NEW_UTS_LEN + 1];
	char domainname[__NEW_UTS_LEN + 1];
};

struct uts_namespace {
	struct new_utsname name;
	void *user_ns;
	u32 ns_inum;
};

struct misaligned_probe {
	u8 pad;
	u64 value;		/* at an odd address: the host writes it byte by byte */
} __attribute__((packed));

extern struct rq runqueues;
extern unsigned long __per_cpu_offset[NR_CPUS];
extern unsigned int nr_cpu_ids;
extern volatile unsigned long jiffies;
extern struct uts_namespace init_uts_ns;
extern struct misaligned_probe misaligned_probe;
extern u32 hot_word;
extern volatile u32 guest_ready;
extern volatile u32 guest_done;
extern volatile u32 guest_command;
extern volatile u32 guest_command_ack;
extern enum scx_rq_flags scx_rq_initial_flags;

/* &runqueues + __per_cpu_offset[cpu], exactly the kernel's per_cpu_ptr(). */
static inline struct rq *cpu_rq(u32 cpu)
{
	unsigned long base;
	/* An absolute reference: RIP-relative would not reach a VA-0 per-CPU symbol. */
	__asm__("movq $runqueues, %0" : "=r"(base));
	return (struct rq *)(base + __per_cpu_offset[cpu]);
}

#endif
