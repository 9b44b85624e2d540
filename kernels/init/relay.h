/* The guest job's output, line by line, into the kernel's log (job-init.c).
 *
 * Why: a kernel message goes out to the serial console past the tty's queue, at any
 * byte.  Written to the console tty, a job's line can be cut in two by one ("vmm-test:
 * scx-cltsc: Marking TSC unstable due to clocksource watchdog" then "ock rc=0"), and a
 * host that parses the line never sees it.  Written to /dev/kmsg, each line is a record
 * of its own, and the console prints records whole and in order, the kernel's and the
 * job's alike.  As a bonus the job's lines are in dmesg, in a vmcore and in drgn's
 * view of the log.
 *
 * How: the job's stdout and stderr are a pseudo-terminal (programs see a terminal, so
 * stdio flushes every line, as on the console; output post-processing is off, so no
 * "\r" is added), and PID 1 copies what comes out of its master side to /dev/kmsg, one
 * write per line.  A record is written at level 0 of facility "user" ("<8>"), which
 * every console level shows, so `quiet` or `echo 1 > /proc/sys/kernel/printk` cannot
 * hide the job's own output.  stdin stays the console, where the host types.
 *
 * Limits, each where the kernel sets it:
 *  - a record holds at most 1024 bytes (PRINTKRB_RECORD_MAX): a longer line goes out
 *    as several, each printed as a line of its own;
 *  - a partial line (a prompt) goes out as a record when no more came for 0.2 s;
 *  - /dev/kmsg drops what it takes when the log is off (printk.devkmsg=off) and
 *    rate-limits it unless it is on: the relay turns it on, and when it cannot, or the
 *    kernel has no /dev/kmsg (no CONFIG_PRINTK) or no pseudo-terminals
 *    (CONFIG_UNIX98_PTYS, devpts), the job writes to the console as before, and the
 *    init says so in a "vmm-job: note" line;
 *  - a job that writes faster than the console prints, by more than the kernel's log
 *    buffer (CONFIG_LOG_BUF_SHIFT, log_buf_len=), loses the oldest of it, and the
 *    kernel prints "** N printk messages dropped **" in its place.
 */
#ifndef VMM_INIT_RELAY_H
#define VMM_INIT_RELAY_H

#include "sys.h"

#define SYS_poll 7
#define SYS_mkdir 83
#define POLLIN 0x1
#define O_NOCTTY 0400
#define O_CLOEXEC 02000000
#define TCGETS 0x5401
#define TCSETS 0x5402
#define TIOCSPTLCK 0x40045431
#define TIOCGPTPEER 0x5441
#define OPOST 0x1
#define EIO 5

#define RECORD_PREFIX "<8>"	       /* facility user (1 << 3), level 0 */
#define RECORD_TEXT_MAX (1024 - 3 - 1) /* PRINTKRB_RECORD_MAX less the prefix and "\n" */
#define PARTIAL_WAIT_MS 200

struct pollfd {
	int fd;
	short events, revents;
};

/* The kernel's struct termios (asm-generic/termbits.h): only c_oflag is touched. */
struct kernel_termios {
	unsigned int c_iflag, c_oflag, c_cflag, c_lflag;
	unsigned char c_line, c_cc[19];
};

struct relay {
	long kmsg;   /* /dev/kmsg, write only; -1: the job writes to the console */
	long master; /* the pseudo-terminal's master side (the job's output comes out here) */
	long peer;   /* its slave side: the job's stdout and stderr */
	size_t len;  /* bytes of a line not yet written */
	char line[RECORD_TEXT_MAX];
};

static long relay_write_file(const char *path, const char *text)
{
	long fd = sys3(SYS_open, (long)path, O_WRONLY, 0), r;

	if (fd < 0)
		return fd;
	r = sys3(SYS_write, fd, (long)text, (long)str_len(text));
	sys3(SYS_close, fd, 0, 0);
	return r;
}

/* Sets the relay up; 0, or why not (a "vmm-job: note" text; r->kmsg stays -1). */
static const char *relay_open(struct relay *r)
{
	struct kernel_termios t;
	long unlock = 0;

	r->kmsg = r->master = r->peer = -1;
	r->len = 0;
	/* Lift /dev/kmsg's rate limit (10 lines in 5 s), or learn that it is locked off. */
	if (relay_write_file("/proc/sys/kernel/printk_devkmsg", "on\n") < 0)
		return "/proc/sys/kernel/printk_devkmsg cannot be set to on (printk.devkmsg= on "
		       "the command line, or no CONFIG_PRINTK)";
	sys3(SYS_mkdir, (long)"/dev/pts", 0755, 0);
	if (sys5(SYS_mount, (long)"devpts", (long)"/dev/pts", (long)"devpts", 0, 0) < 0)
		return "no devpts to mount on /dev/pts (CONFIG_UNIX98_PTYS)";
	r->master = sys3(SYS_open, (long)"/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC, 0);
	if (r->master < 0 || sys3(SYS_ioctl, r->master, TIOCSPTLCK, (long)&unlock) < 0)
		return "/dev/ptmx does not open (CONFIG_UNIX98_PTYS)";
	r->peer = sys3(SYS_ioctl, r->master, TIOCGPTPEER, O_RDWR | O_NOCTTY);
	if (r->peer < 0)
		return "no pseudo-terminal peer (TIOCGPTPEER)";
	if (sys3(SYS_ioctl, r->peer, TCGETS, (long)&t) == 0) {
		t.c_oflag &= ~(unsigned int)OPOST; /* "\n" stays "\n", not "\r\n" */
		sys3(SYS_ioctl, r->peer, TCSETS, (long)&t);
	}
	r->kmsg = sys3(SYS_open, (long)"/dev/kmsg", O_WRONLY | O_CLOEXEC, 0);
	if (r->kmsg < 0)
		return "/dev/kmsg does not open (CONFIG_PRINTK)";
	return 0;
}

/* One record: the prefix, `len` bytes of text, and a newline.  The newline matters: a
 * record without one stays open for a continuation (printk's pr_cont) and is not
 * final, so the console does not print it until the next record comes, which for a
 * job's last line before it waits (on input, say) may be never. */
static void relay_record(long kmsg, const char *text, size_t len)
{
	char out[sizeof(RECORD_PREFIX) + RECORD_TEXT_MAX + 1];
	size_t n = 0;

	for (const char *p = RECORD_PREFIX; *p; p++)
		out[n++] = *p;
	for (size_t i = 0; i < len && i < RECORD_TEXT_MAX; i++)
		out[n++] = text[i];
	out[n++] = '\n';
	sys3(SYS_write, kmsg, (long)out, (long)n);
}

/* Writes every whole line held (and, with `all`, the partial one too). */
static void relay_flush(struct relay *r, int all)
{
	char *text = r->line;
	size_t start = 0;

	for (size_t i = 0; i < r->len; i++) {
		if (text[i] != '\n')
			continue;
		relay_record(r->kmsg, text + start, i - start);
		start = i + 1;
	}
	if (start == 0 && r->len == RECORD_TEXT_MAX)
		all = 1; /* a line longer than a record: this much goes out now */
	if (all && start < r->len) {
		relay_record(r->kmsg, text + start, r->len - start);
		start = r->len;
	}
	for (size_t i = start; i < r->len; i++)
		text[i - start] = text[i];
	r->len -= start;
}

/* Reads what the master side has; -1 once no process holds the job's side open. */
static long relay_read(struct relay *r)
{
	long got = sys3(SYS_read, r->master, (long)(r->line + r->len), (long)(RECORD_TEXT_MAX - r->len));

	if (got > 0) {
		r->len += (size_t)got;
		relay_flush(r, 0);
		return got;
	}
	return got == 0 || got == -EIO ? -1 : 0;
}

/* Copies the job's output until `done(arg)` says the job ended (it is asked at least
 * every 100 ms), then what is left in the pseudo-terminal, then the partial line. */
static void relay_run(struct relay *r, int (*done)(void *), void *arg)
{
	int open = 1, quiet_ms = 0;

	while (!done(arg)) {
		/* Once the job's side is closed, the fd is left out and poll only waits. */
		struct pollfd p = {open ? (int)r->master : -1, POLLIN, 0};
		long n = sys3(SYS_poll, (long)&p, 1, 100);

		if (n > 0) {
			if (relay_read(r) < 0)
				open = 0; /* everyone closed the job's side: only the end is left */
			quiet_ms = 0;
		} else if (n == 0 && r->len && (quiet_ms += 100) >= PARTIAL_WAIT_MS) {
			relay_flush(r, 1); /* a prompt, say: out it goes, as a line */
			quiet_ms = 0;
		}
	}
	if (open) {
		/* What the job wrote before it ended is in the pty already: take it all. */
		for (;;) {
			struct pollfd p = {(int)r->master, POLLIN, 0};
			if (sys3(SYS_poll, (long)&p, 1, 0) <= 0 || relay_read(r) <= 0)
				break;
		}
	}
	relay_flush(r, 1);
}

#endif
