/* check-init: proves user space runs, then powers the VM off.
 *
 * 1. prints "vmm-check-init: start" to the console,
 * 2. mounts /proc and prints each file named on its command line (kernel
 *    command line words after "--"; a bare name means /proc/<name>), or
 *    /proc/version when none is named,
 *    The word "wait-hostname" instead waits (up to 60 s) until the hostname is
 *    no longer "(none)": the host writes init_uts_ns.name.nodename while the VM
 *    is frozen, and this proves the guest sees it,
 * 3. prints "vmm-check-init: done status=<n>" (n = number of files that could
 *    not be read), writes n to the exit port 0xf4 when ioperm() works
 *    (CONFIG_X86_IOPL_IOPERM), drains the console (tcdrain) and powers off with
 *    reboot(POWER_OFF).
 *
 * Needs working system calls: hosts with hardware virtualization only (on a
 * PVM host use spin-init).
 */
#include "sys.h"

#define EXIT_PORT 0xf4

static int console = 1;

static void put(const char *s)
{
	sys3(SYS_write, console, (long)s, (long)str_len(s));
}

static void put_uint(unsigned long v)
{
	char buf[24];
	int i = sizeof(buf) - 1;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	put(buf + i);
}

/* Copy "/proc/" + name (or name when it already starts with /proc/) into buf.
 * Names with ".." are refused: only files under /proc are read. */
static int proc_path(const char *name, char *buf, size_t size)
{
	const char *prefix = starts_with(name, "/proc/") ? "" : "/proc/";
	size_t n = 0;
	for (const char *p = name; *p; p++)
		if (p[0] == '.' && p[1] == '.')
			return -1;
	for (const char *p = prefix; *p && n + 1 < size; p++)
		buf[n++] = *p;
	for (const char *p = name; *p && n + 1 < size; p++)
		buf[n++] = *p;
	buf[n] = 0;
	return n + 1 < size ? 0 : -1;
}

static int print_file(const char *name)
{
	char path[256], data[512];
	long fd, got;

	if (proc_path(name, path, sizeof(path)) < 0) {
		put("vmm-check-init: refused ");
		put(name);
		put("\n");
		return -1;
	}
	fd = sys3(SYS_open, (long)path, O_RDONLY, 0);
	if (fd < 0) {
		put("vmm-check-init: cannot open ");
		put(path);
		put("\n");
		return -1;
	}
	put("vmm-check-init: == ");
	put(path);
	put("\n");
	while ((got = sys3(SYS_read, fd, (long)data, sizeof(data))) > 0)
		sys3(SYS_write, console, (long)data, got);
	sys3(SYS_close, fd, 0, 0);
	return got < 0 ? -1 : 0;
}

static int hostname_set(void)
{
	char data[80];
	long fd = sys3(SYS_open, (long)"/proc/sys/kernel/hostname", O_RDONLY, 0);
	long got;

	if (fd < 0)
		return 0;
	got = sys3(SYS_read, fd, (long)data, sizeof(data));
	sys3(SYS_close, fd, 0, 0);
	return got > 0 && !(got == 7 && starts_with(data, "(none)\n"));
}

static int wait_hostname(void)
{
	struct { long sec, nsec; } tick = {0, 10 * 1000 * 1000};

	put("vmm-check-init: waiting for the host to set the hostname\n");
	for (int i = 0; i < 6000; i++) {
		if (hostname_set())
			return 0;
		sys3(SYS_nanosleep, (long)&tick, 0, 0);
	}
	put("vmm-check-init: the hostname never changed\n");
	return -1;
}

static int str_eq(const char *a, const char *b)
{
	return starts_with(a, b) && str_len(a) == str_len(b);
}

void init_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned long failures = 0;

	/* The kernel gives init /dev/console as fds 0-2 when the initramfs has it;
	 * open it ourselves if fd 1 is not usable. */
	if (sys3(SYS_write, 1, (long)"", 0) < 0)
		console = (int)sys3(SYS_open, (long)"/dev/console", O_WRONLY, 0);

	put("vmm-check-init: start\n");
	sys5(SYS_mount, (long)"proc", (long)"/proc", (long)"proc", 0, 0);
	if (argc <= 1)
		failures += print_file("version") != 0;
	for (long i = 1; i < argc; i++)
		failures += (str_eq(argv[i], "wait-hostname") ? wait_hostname() : print_file(argv[i])) != 0;

	put("vmm-check-init: done status=");
	put_uint(failures);
	put("\n");

	/* Every byte out of the serial port before the power-off: what the tty still
	 * holds then is lost (one lane run's console ended mid-/proc/cpuinfo). */
	sys3(SYS_ioctl, console, TCSBRK, 1);
	if (sys3(SYS_ioperm, EXIT_PORT, 1, 1) == 0)
		__asm__ volatile("outb %b0, %w1" : : "a"((unsigned char)failures), "Nd"(EXIT_PORT));
	sys5(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF, 0, 0);
	/* init must never return; spin if power-off was refused. */
}

DEFINE_START(init_main);
