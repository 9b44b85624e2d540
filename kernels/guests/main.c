/* boot_main: common C entry of both boot protocols; picks the mode from the command line. */
#include "sched.h"

#define BOOT_LINUX 0
#define BOOT_PVH 1
#define HVM_START_MAGIC 0x336ec578u
/* boot_params (zero page) offsets, Documentation/arch/x86/zero-page.rst */
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_CMD_LINE_PTR 0x228
/* struct hvm_start_info offsets */
#define HVM_MAGIC 0
#define HVM_CMDLINE_PADDR 24

enum guest_mode { MODE_HELLO, MODE_LOOP, MODE_OUTLOOP, MODE_RESET, MODE_TRIPLE,
		  MODE_BADINSN, MODE_FAULT, MODE_FLOOD };
static const char *const mode_names[] = { "hello", "loop", "outloop", "reset", "triple",
					  "badinsn", "fault", "flood" };

u32 boot_protocol;

static u32 rd32(unsigned long phys) { return *(volatile u32 *)phys; }
static u64 rd64(unsigned long phys) { return *(volatile u64 *)phys; }

/* Both info pointers are physical; the identity map makes them usable as is. */
static void copy_command_line(u32 protocol, unsigned long info)
{
	unsigned long cmdline = 0;
	if (protocol == BOOT_LINUX && info) {
		cmdline = rd32(info + BP_CMD_LINE_PTR) |
			  ((unsigned long)rd32(info + BP_EXT_CMD_LINE_PTR) << 32);
	} else if (protocol == BOOT_PVH && info && rd32(info + HVM_MAGIC) == HVM_START_MAGIC) {
		cmdline = rd64(info + HVM_CMDLINE_PADDR);
	}
	/* Only the identity-mapped first 4 GiB is reachable. */
	cmdline_copy(cmdline && cmdline < (1UL << 32) ? (const char *)cmdline : NULL);
}

static enum guest_mode parse_mode(void)
{
	char buf[16];
	if (!cmdline_get("mode", buf, sizeof(buf)))
		return MODE_HELLO;
	for (u32 m = 0; m < sizeof(mode_names) / sizeof(mode_names[0]); m++)
		if (!strncmp(buf, mode_names[m], sizeof(buf)))
			return (enum guest_mode)m;
	printf_serial("vmm-guest: unknown mode=%s\n", buf);
	guest_exit(EXIT_BAD_CMDLINE);
}

static u32 parse_ring(void)
{
	u64 ring = cmdline_u64("ring", 3);
	if (ring != 0 && ring != 3) {
		printf_serial("vmm-guest: ring=%d: only 0 and 3\n", ring);
		guest_exit(EXIT_BAD_CMDLINE);
	}
	return (u32)ring;
}

/* mode=outloop: n port writes, each a VM exit, then exit (per-exit cost benchmark). */
static void outloop_body(u64 arg)
{
	(void)arg;
	u64 n = cmdline_u64("n", 1000);
	u16 port = (u16)cmdline_u64("port", OUTLOOP_DEFAULT_PORT);
	u32 rec[3] = { (u32)n, (u32)(n >> 32), work_params.ring };
	report(REC_OUTLOOP, rec, 3);
	for (u64 i = 0; i < n; i++)
		outl(port, (u32)i);
	guest_exit(work_params.exit_code);
}

static __attribute__((noreturn)) void run_outloop(void)
{
	if (work_params.ring == 3)
		enter_ring3((void (*)(u64))outloop_body, 0, user_stack_top(0) - 8);
	outloop_body(0);
	guest_exit(work_params.exit_code);
}

/* mode=flood: console lines without pause, "vmm-guest: flood N " and padding to 64
 * bytes with the newline, N counting from 0; n lines (0, the default: forever), then
 * "vmm-guest: flood done" and exit (bounded console memory on the host). */
static __attribute__((noreturn)) void run_flood(void)
{
	u64 n = cmdline_u64("n", 0);
	for (u64 i = 0; !n || i < n; i++) {
		/* "vmm-guest: flood " is 17 bytes; the number and the dots fill 46. */
		u64 digits = 1;
		for (u64 v = i; v >= 10; v /= 10)
			digits++;
		printf_serial("vmm-guest: flood %d %s\n", i,
			      "................................................" + 48 - (46 - 1 - digits));
	}
	puts_serial("vmm-guest: flood done\n");
	guest_exit(work_params.exit_code);
}

static __attribute__((noreturn)) void run_triple(void)
{
	/* An empty IDT: the #UD cannot be delivered -> #DF -> shutdown (triple fault). */
	struct { u16 limit; u64 base; } __attribute__((packed)) empty = { 0, 0 };
	__asm__ volatile("lidt %0; ud2" :: "m"(empty));
	guest_exit(EXIT_NOT_REACHED);
}

static __attribute__((noreturn)) void run_badinsn(void)
{
	/* xsave: the PVM ring-0 emulator cannot execute it (KVM internal error). On
	 * hardware with CR4.OSXSAVE clear it is #UD instead, reported as exit 0x7f. */
	static u8 area[4096] __attribute__((aligned(64)));
	__asm__ volatile("xsave %0" : "+m"(area) : "a"(~0u), "d"(~0u));
	guest_exit(EXIT_NOT_REACHED);
}

static __attribute__((noreturn)) void run_fault(void)
{
	/* A write to an unmapped address (PML4 slot 1): #PF, reported, exit 0x7f. */
	*(volatile u64 *)0x0000008000000000UL = 1;
	guest_exit(EXIT_NOT_REACHED);
}

/* request=NAME (mode=loop): before its work loop the BSP asks the host over COM2
 * (vmm/runtime/requests.py) with "1 NAME cpu=0", reads the one-line reply and prints
 * it with what it then reads of its own rq->scx (flags, clock). */
static void ask_host(const char *name)
{
	char reply[160];
	u32 n = 0;
	const char *parts[3] = { "1 ", name, " cpu=0\n" };
	for (u32 i = 0; i < 3; i++)
		for (const char *p = parts[i]; *p; p++) {
			for (u32 k = 0; k < 1000 && !(inb(COM2_LSR) & LSR_THRE); k++)
				cpu_relax();
			outb(COM2_PORT, (u8)*p);
		}
	for (;;) {
		u8 lsr = inb(COM2_LSR);
		if (lsr == 0xff) { /* no UART there */
			puts_serial("vmm-guest: no COM2\n");
			return;
		}
		if (!(lsr & LSR_DR)) {
			cpu_relax();
			continue;
		}
		char c = (char)inb(COM2_PORT);
		if (c == '\n')
			break;
		if (n < sizeof(reply) - 1)
			reply[n++] = c;
	}
	reply[n] = 0;
	struct rq *rq = cpu_rq(0);
	printf_serial("vmm-guest: reply: %s\nvmm-guest: after the reply rq 0 scx.flags=%x scx.clock=%d\n",
		      reply, (u64)__atomic_load_n(&rq->scx.flags, __ATOMIC_ACQUIRE),
		      READ_ONCE(rq->scx.clock));
}

__attribute__((noreturn)) void boot_main(u32 protocol, unsigned long info)
{
	boot_protocol = protocol;
	copy_command_line(protocol, info);

	enum guest_mode mode = parse_mode();
	u64 cpus = cmdline_u64("cpus", 1);
	if (cpus < 1 || cpus > MAX_CPUS) {
		printf_serial("vmm-guest: cpus=%d: must be 1..%d\n", cpus, (u64)MAX_CPUS);
		guest_exit(EXIT_BAD_CMDLINE);
	}
	work_params.nr_cpus = mode == MODE_LOOP ? (u32)cpus : 1;
	u64 possible = cmdline_u64("possible", work_params.nr_cpus);
	if (possible < work_params.nr_cpus || possible > NR_CPUS) {
		printf_serial("vmm-guest: possible=%d: must be %d..%d\n", possible,
			      (u64)work_params.nr_cpus, (u64)NR_CPUS);
		guest_exit(EXIT_BAD_CMDLINE);
	}
	work_params.ring = parse_ring();
	work_params.loops = cmdline_u64("loop", 0);
	work_params.exit_code = (u32)cmdline_u64("exit", 0) & 0xff;
	u64 tick = cmdline_u64("tick", work_params.ring == 3 ? 1UL << 20 : 1UL << 8);
	if (!tick || (tick & (tick - 1))) {
		printf_serial("vmm-guest: tick=%d must be a power of two\n", tick);
		guest_exit(EXIT_BAD_CMDLINE);
	}
	work_params.tick = tick;
	work_params.hot_every = cmdline_u64("hot_every", 4);
	if (!work_params.hot_every)
		work_params.hot_every = 1;

	cpu_tables_init(work_params.nr_cpus);
	cpu_load_tables(0);

	u32 rec[4] = { protocol, work_params.nr_cpus, work_params.ring, (u32)mode };
	report(REC_BOOT, rec, 4);

	switch (mode) {
	case MODE_HELLO:
		printf_serial("vmm-guest: hello\nvmm-guest: boot protocol %s\nvmm-guest: cmdline: %s\n",
			      protocol == BOOT_PVH ? "pvh" : "linux", boot_command_line);
		guest_exit(work_params.exit_code);
	case MODE_OUTLOOP:
		run_outloop();
	case MODE_RESET:
		puts_serial("vmm-guest: reset\n");
		outb(I8042_CMD_PORT, I8042_RESET);
		for (u32 i = 0; i < 1000000; i++)
			cpu_relax();
		guest_exit(EXIT_NOT_REACHED);
	case MODE_TRIPLE:
		puts_serial("vmm-guest: triple fault\n");
		run_triple();
	case MODE_BADINSN:
		puts_serial("vmm-guest: bad instruction\n");
		run_badinsn();
	case MODE_FAULT:
		puts_serial("vmm-guest: page fault\n");
		run_fault();
	case MODE_FLOOD:
		run_flood();
	case MODE_LOOP:
		break;
	}

	percpu_setup(work_params.nr_cpus, (u32)possible);
	if (work_params.nr_cpus > 1)
		smp_boot_aps(work_params.nr_cpus);
	char request[64];
	if (cmdline_get("request", request, sizeof(request)) && request[0])
		ask_host(request);
	cpu_work_start(0);
}
