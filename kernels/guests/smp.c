/*
 * AP startup: INIT / SIPI / SIPI through the local APIC (xAPIC MMIO at 0xfee00000),
 * one AP at a time, with the real-mode trampoline copied to AP_TRAMPOLINE_PHYS.
 * APIC IDs are assumed to be 0..N-1 (KVM's and QEMU's default).
 */
#include "sched.h"

#define APIC_ID 0x20
#define APIC_SVR 0xf0
#define APIC_ICR_LO 0x300
#define APIC_ICR_HI 0x310
#define ICR_BUSY (1u << 12)
#define ICR_INIT 0x00004500u		/* INIT, level assert */
#define ICR_STARTUP 0x00004600u		/* start-up IPI, vector in bits 0..7 */
/*
 * How long to wait for an AP: at least AP_WAIT_SPINS polls AND AP_WAIT_TSC cycles. Spins
 * alone would be ~35 s under PVM's ring-0 emulation for a useful native bound; the TSC
 * alone needs a calibration we do not have. Together: ~3 s emulated, ~1 s native.
 */
#define AP_WAIT_SPINS 300000u
#define AP_WAIT_TSC 2000000000ull

/* Parameter block at the end of the trampoline (head.S ap_tramp_params). */
struct tramp_params {
	u16 gdt_limit;
	u32 gdt_base_phys;
	u16 pad;
	u64 cr3;
	u64 stack;
	u64 entry;
	u64 cpu;
} __attribute__((packed));

extern char ap_tramp_params[];
extern char ap_entry64[];
extern u64 gdt[GDT_ENTRIES];
extern char early_pml4[];

volatile u32 ap_started;

static volatile u32 *lapic(u32 reg)
{
	return (volatile u32 *)(unsigned long)(LAPIC_BASE + reg);	/* identity map */
}

static void send_ipi(u32 apic_id, u32 icr)
{
	*lapic(APIC_ICR_HI) = apic_id << 24;
	*lapic(APIC_ICR_LO) = icr;
	for (u32 i = 0; i < 100000 && (*lapic(APIC_ICR_LO) & ICR_BUSY); i++)
		cpu_relax();
}

static u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static unsigned long virt_to_phys(const void *p)
{
	return (unsigned long)p - START_KERNEL_MAP;
}

/* Called on each AP by ap_entry64 (head.S). */
__attribute__((noreturn)) void ap_main(u32 cpu)
{
	cpu_load_tables(cpu);
	__atomic_fetch_add(&ap_started, 1, __ATOMIC_RELEASE);
	cpu_work_start(cpu);
}

void smp_boot_aps(u32 nr_cpus)
{
	u8 *tramp = (u8 *)(unsigned long)AP_TRAMPOLINE_PHYS;	/* identity map */
	size_t size = (size_t)(ap_trampoline_end - ap_trampoline_start);
	struct tramp_params *params =
		(struct tramp_params *)(tramp + (ap_tramp_params - ap_trampoline_start));

	memcpy(tramp, ap_trampoline_start, size);
	params->gdt_limit = GDT_ENTRIES * 8 - 1;
	params->gdt_base_phys = (u32)virt_to_phys(gdt);
	params->cr3 = virt_to_phys(early_pml4);
	params->entry = (u64)ap_entry64;

	*lapic(APIC_SVR) = 0x1ff;	/* software-enable the local APIC, spurious vector 0xff */

	for (u32 cpu = 1; cpu < nr_cpus; cpu++) {
		params->stack = kernel_stack_top(cpu);
		params->cpu = cpu;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		send_ipi(cpu, ICR_INIT);
		send_ipi(cpu, ICR_STARTUP | (AP_TRAMPOLINE_PHYS >> 12));
		u64 t0 = rdtsc();
		for (u32 i = 0; READ_ONCE(ap_started) < cpu; i++) {
			if (i == 1000)	/* the second SIPI of the MP spec, if still needed */
				send_ipi(cpu, ICR_STARTUP | (AP_TRAMPOLINE_PHYS >> 12));
			if (i >= AP_WAIT_SPINS && rdtsc() - t0 >= AP_WAIT_TSC)
				break;
			cpu_relax();
		}
		if (READ_ONCE(ap_started) < cpu) {
			printf_serial("vmm-guest: cpu %d (APIC ID %d) did not start\n",
				      (u64)cpu, (u64)cpu);
			guest_exit(EXIT_AP_TIMEOUT);
		}
	}
}
