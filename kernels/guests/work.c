/*
 * The per-CPU work loop (mode=loop). The same code runs at CPL 3 (default, native speed
 * under PVM) or CPL 0 (emulated): it only touches memory and does port I/O.
 *
 * Each iteration: counter++, acquire-read scx.flags, and when SCX_RQ_CLK_VALID is set,
 * read scx.clock; read the misaligned probe and check its bytes are all equal. Every
 * `tick` iterations: nr_switches++, the BSP advances jiffies, the CPU sets its next
 * hot_word bit, and looks at guest_command.
 */
#include "sched.h"

struct work_params work_params;

static bool bytes_all_equal(u64 v)
{
	return v == (v & 0xff) * 0x0101010101010101ULL;
}

static void report_summary(u32 cpu, struct rq *rq)
{
	u64 torn = READ_ONCE(rq->torn_reads);
	u32 rec[9] = {
		cpu, (u32)rq->counter, (u32)(rq->counter >> 32), rq->obs_events,
		(u32)rq->obs_inconsistent, (u32)(torn > 0xffffffffu ? 0xffffffffu : torn),
		__atomic_load_n(&hot_word, __ATOMIC_ACQUIRE),
		(u32)rq->probe_last, (u32)(rq->probe_last >> 32),
	};
	report(REC_SUMMARY, rec, 9);
}

static void observe_clock(u32 cpu, struct rq *rq, u32 flags, u64 clock, u64 count)
{
	rq->obs_flags = flags;
	rq->obs_clock = clock;
	rq->obs_count = count;
	rq->obs_events++;
	u32 rec[7] = { cpu, flags, (u32)clock, (u32)(clock >> 32), (u32)count,
		       (u32)(count >> 32), rq->obs_events };
	report(REC_OBS, rec, 7);
	printf_serial("vmm-guest: cpu %d saw SCX_RQ_CLK_VALID flags %x clock %x at count %d\n",
		      (u64)cpu, (u64)flags, clock, count);
}

static void set_next_hot_bit(u32 cpu, struct rq *rq)
{
	if (rq->hot_next >= 16)
		return;
	u32 bit = 1u << rq->hot_next;
	__asm__ volatile("lock orl %1, %0" : "+m"(hot_word) : "r"(bit) : "memory");
	rq->hot_next += work_params.nr_cpus;
	if (rq->hot_next >= 16) {
		u32 rec[2] = { cpu, __atomic_load_n(&hot_word, __ATOMIC_ACQUIRE) };
		report(REC_HOT, rec, 2);
	}
}

static void stop_cpu(u32 cpu, struct rq *rq)
{
	report_summary(cpu, rq);
	WRITE_ONCE(rq->loop_done, 1);
	__atomic_fetch_add(&guest_done, 1, __ATOMIC_RELEASE);
}

/* Returns true when the CPU must stop (CMD_STOP). */
static bool handle_command(u32 cpu, struct rq *rq, u32 cmd)
{
	rq->cmd_seen = cmd;
	u32 rec[2] = { cpu, cmd };
	report(REC_CMD, rec, 2);
	switch (cmd & 0xff) {
	case CMD_UTS:
		if (cpu == 0) {
			u32 words[18] = { 0 };
			char *bytes = (char *)&words[1];
			const char *name = init_uts_ns.name.nodename;
			u32 n = 0;
			while (n < __NEW_UTS_LEN && name[n])
				n++;
			words[0] = n;
			memcpy(bytes, name, n);
			report(REC_UTS, words, 18);
			printf_serial("vmm-guest: nodename %s\n", bytes);
		}
		break;
	case CMD_SUMMARY:
		report_summary(cpu, rq);
		break;
	case CMD_STOP:
		return true;
	}
	if (cpu == 0)
		WRITE_ONCE(guest_command_ack, cmd);
	return false;
}

static __attribute__((noreturn)) void bsp_finish(u32 code)
{
	while (READ_ONCE(guest_done) < work_params.nr_cpus)
		cpu_relax();
	printf_serial("vmm-guest: done, %d cpus stopped, hot_word %x, exit %d\n",
		      (u64)work_params.nr_cpus, (u64)__atomic_load_n(&hot_word, __ATOMIC_ACQUIRE),
		      (u64)code);
	guest_exit(code);
}

static __attribute__((noreturn)) void park(void)
{
	for (;;) {
		if (work_params.ring == 0)
			__asm__ volatile("cli; hlt");
		else
			cpu_relax();
	}
}

static __attribute__((noreturn)) void work_loop(u64 cpu_arg)
{
	u32 cpu = (u32)cpu_arg;
	struct rq *rq = cpu_rq(cpu);
	const u64 tick_mask = work_params.tick - 1;
	const u64 limit = work_params.loops;
	bool valid_seen = false;
	u32 exit_code = work_params.exit_code;

	rq->ring = work_params.ring;
	u32 rec[2] = { cpu, work_params.ring };
	report(REC_READY, rec, 2);
	if (__atomic_add_fetch(&guest_ready, 1, __ATOMIC_ACQ_REL) == work_params.nr_cpus)
		printf_serial("vmm-guest: %d cpus up (ring %d)\n", (u64)work_params.nr_cpus,
			      (u64)work_params.ring);

	for (;;) {
		u64 count = rq->counter + 1;
		WRITE_ONCE(rq->counter, count);

		/* Like scx_rq_clock_update()'s readers: flags with acquire, then clock. */
		u32 flags = __atomic_load_n(&rq->scx.flags, __ATOMIC_ACQUIRE);
		if (flags & SCX_RQ_CLK_VALID) {
			u64 clock = READ_ONCE(rq->scx.clock);
			if (!valid_seen) {
				valid_seen = true;
				observe_clock(cpu, rq, flags, clock, count);
			} else if (clock != rq->obs_clock) {
				rq->obs_inconsistent++;
			}
		} else {
			valid_seen = false;
		}

		u64 probe = READ_ONCE(misaligned_probe.value);
		if (!bytes_all_equal(probe))
			rq->torn_reads++;
		rq->probe_last = probe;

		if ((count & tick_mask) == 0) {
			rq->nr_switches++;
			if (cpu == 0)
				WRITE_ONCE(jiffies, jiffies + 1);
			if (rq->nr_switches % work_params.hot_every == 0)
				set_next_hot_bit(cpu, rq);
			u32 cmd = READ_ONCE(guest_command);
			if (cmd != rq->cmd_seen && handle_command(cpu, rq, cmd)) {
				exit_code = (cmd >> 8) & 0xff;
				break;
			}
		}
		if (limit && count >= limit)
			break;
	}
	stop_cpu(cpu, rq);
	if (cpu == 0)
		bsp_finish(exit_code);
	park();
}

/* Called by every CPU (BSP last) once its descriptor tables are loaded. */
__attribute__((noreturn)) void cpu_work_start(u32 cpu)
{
	if (work_params.ring == 3) {
		/* rsp = top - 8: a function entry sees rsp+8 16-byte aligned. */
		enter_ring3(work_loop, cpu, user_stack_top(cpu) - 8);
	}
	work_loop(cpu);
}
