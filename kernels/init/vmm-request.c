/* vmm-request: ask the host (vmm) for something and print its answer.
 *
 *   vmm-request [-d DEV] [-c CPU] [-t SECONDS] NAME [ARGS...]
 *   vmm-request [-d DEV] [-t SECONDS] -r LINE       (send LINE as it is)
 *
 * The channel is the VM's second UART, COM2 (port 0x2f8, IRQ 3), which Linux's 8250
 * driver finds as /dev/ttyS1 (default DEV).  The protocol (docs/requests.md,
 * vmm/runtime/requests.py): one request line of printable ASCII, at most 4096 bytes
 * with its newline,
 *
 *     <id> <name> [args...]\n
 *
 * answered by one line
 *
 *     <id> ok [text]\n        or        <id> error <message>\n
 *
 * The id is this process's pid; a reply with another id (a late answer to an
 * earlier, timed-out request) is skipped.  While the host serves the request every
 * vCPU is frozen; the reply comes after the thaw.
 *
 * -c CPU pins this process to CPU (sched_setaffinity) and sends "cpu=N", N being
 * the CPU it then runs on (getcpu), as the first argument: the host learns "the
 * requester's own CPU".  -t: how long to wait for the reply (default 30 s).
 * -r LINE: send LINE verbatim, however long (tests of malformed and oversized
 * requests), and take the first reply line, whatever its id.
 *
 * The tty is set raw (no echo, no CR/NL translation, 8 bits) and its input flushed
 * before the request.  Prints the reply's text on stdout (an error's on stderr).
 * Exit status: 0 ok, 1 error reply, 2 timeout, I/O error or bad usage.
 *
 * Static, no libc (kernels/init/sys.h): it goes into every guest-job initramfs as
 * /bin/vmm-request (vmm/machine/guestjob.py).  Needs working system calls.
 */
#include "sys.h"

#define SYS_poll 7
#define SYS_ioctl 16
#define SYS_getpid 39
#define SYS_sched_setaffinity 203
#define SYS_clock_gettime 228
#define SYS_getcpu 309

#define O_RDWR 2
#define O_NOCTTY 0400
#define CLOCK_MONOTONIC 1
#define POLLIN 1
#define EINTR 4

#define TCGETS 0x5401
#define TCSETS 0x5402
#define TCFLSH 0x540B
#define TCIFLUSH 0

/* struct termios as the TCGETS/TCSETS ioctls take it (asm-generic/termbits.h). */
struct kernel_termios {
	unsigned int c_iflag, c_oflag, c_cflag, c_lflag;
	unsigned char c_line;
	unsigned char c_cc[19];
};
#define IGNBRK 0000001
#define BRKINT 0000002
#define PARMRK 0000010
#define ISTRIP 0000040
#define INLCR 0000100
#define IGNCR 0000200
#define ICRNL 0000400
#define IXON 0002000
#define IXOFF 0010000
#define OPOST 0000001
#define CSIZE 0000060
#define CS8 0000060
#define CREAD 0000200
#define PARENB 0000400
#define CLOCAL 0004000
#define ISIG 0000001
#define ICANON 0000002
#define ECHO 0000010
#define ECHONL 0000100
#define IEXTEN 0100000
#define VTIME 5
#define VMIN 6

#define MAX_LINE 4096

struct timespec_k {
	long tv_sec, tv_nsec;
};
struct pollfd_k {
	int fd;
	short events, revents;
};

static int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static void put_fd(int fd, const char *s, size_t n)
{
	while (n) {
		long w = sys3(SYS_write, fd, (long)s, (long)n);
		if (w == -EINTR)
			continue;
		if (w <= 0)
			return;
		s += w;
		n -= (size_t)w;
	}
}

static void err(const char *a, const char *b)
{
	put_fd(2, "vmm-request: ", 13);
	put_fd(2, a, str_len(a));
	if (b)
		put_fd(2, b, str_len(b));
	put_fd(2, "\n", 1);
}

static __attribute__((noreturn)) void quit(int code)
{
	for (;;)
		sys3(SYS_exit, code, 0, 0);
}

static int parse_uint(const char *s, unsigned long *out)
{
	unsigned long v = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > 100000000UL)
			return -1;
		v = v * 10 + (unsigned long)(*s - '0');
	}
	*out = v;
	return 0;
}

/* Appends to a bounded line buffer; returns -1 once it would pass MAX_LINE - 1. */
struct line {
	char buf[MAX_LINE];
	size_t n;
};

static int add(struct line *l, const char *s)
{
	size_t k = str_len(s);
	if (l->n + k > MAX_LINE - 1)
		return -1;
	for (size_t i = 0; i < k; i++)
		l->buf[l->n++] = s[i];
	return 0;
}

static void fmt_uint(char *buf, unsigned long v)
{
	char tmp[24];
	int i = 0, j = 0;
	do {
		tmp[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		buf[j++] = tmp[--i];
	buf[j] = 0;
}

static long now_ms(void)
{
	struct timespec_k ts;
	sys3(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&ts, 0);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char usage[] =
	"usage: vmm-request [-d DEV] [-c CPU] [-t SECONDS] NAME [ARGS...]\n"
	"       vmm-request [-d DEV] [-t SECONDS] -r LINE\n";

static struct line req, reply;

void request_main(long *sp)
{
	int argc = (int)sp[0];
	char **argv = (char **)(sp + 1);
	const char *dev = "/dev/ttyS1", *raw = 0, *name = "", *cpu_arg = "";
	unsigned long cpu = 0, timeout_s = 30;
	int pin = 0, i = 1;
	char num[24], on_cpu[24];

	for (; i < argc && argv[i][0] == '-'; i++) {
		const char *o = argv[i];
		if (str_eq(o, "--")) {
			i++;
			break;
		}
		if (i + 1 >= argc || o[2]) {
			put_fd(2, usage, sizeof(usage) - 1);
			quit(2);
		}
		if (o[1] == 'd')
			dev = argv[++i];
		else if (o[1] == 'r')
			raw = argv[++i];
		else if (o[1] == 'c' && parse_uint(argv[i + 1], &cpu) == 0 && cpu < 1024)
			pin = 1, cpu_arg = argv[++i];
		else if (o[1] == 't' && parse_uint(argv[i + 1], &timeout_s) == 0)
			i++;
		else {
			put_fd(2, usage, sizeof(usage) - 1);
			quit(2);
		}
	}
	if (!raw && i >= argc) {
		put_fd(2, usage, sizeof(usage) - 1);
		quit(2);
	}

	fmt_uint(num, (unsigned long)sys3(SYS_getpid, 0, 0, 0));
	if (!raw) {
		name = argv[i++];
		add(&req, num);
		add(&req, " ");
		if (add(&req, name) < 0) {
			err("the request is longer than 4095 bytes", 0);
			quit(2);
		}
		if (pin) {
			static unsigned long mask[16]; /* 1024 CPUs */
			unsigned int on = 0, node = 0;
			mask[cpu / 64] = 1UL << (cpu % 64);
			if (sys3(SYS_sched_setaffinity, 0, sizeof(mask), (long)mask) < 0) {
				err("sched_setaffinity failed (no such CPU?): -c ", cpu_arg);
				quit(2);
			}
			sys3(SYS_getcpu, (long)&on, (long)&node, 0);
			fmt_uint(on_cpu, on);
			add(&req, " cpu=");
			add(&req, on_cpu);
		}
		for (; i < argc; i++) {
			if (add(&req, " ") < 0 || add(&req, argv[i]) < 0) {
				err("the request is longer than 4095 bytes", 0);
				quit(2);
			}
		}
	}
	if (!raw)
		req.buf[req.n++] = '\n';

	long fd = sys3(SYS_open, (long)dev, O_RDWR | O_NOCTTY, 0);
	if (fd < 0) {
		err("cannot open ", dev);
		quit(2);
	}
	struct kernel_termios t;
	if (sys3(SYS_ioctl, fd, TCGETS, (long)&t) < 0) {
		err("not a tty: ", dev);
		quit(2);
	}
	t.c_iflag &= ~(unsigned)(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON | IXOFF);
	t.c_oflag &= ~(unsigned)OPOST;
	t.c_lflag &= ~(unsigned)(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
	t.c_cflag &= ~(unsigned)(CSIZE | PARENB);
	t.c_cflag |= CS8 | CREAD | CLOCAL;
	t.c_cc[VMIN] = 1;
	t.c_cc[VTIME] = 0;
	if (sys3(SYS_ioctl, fd, TCSETS, (long)&t) < 0) {
		err("cannot set the tty raw: ", dev);
		quit(2);
	}
	sys3(SYS_ioctl, fd, TCFLSH, TCIFLUSH); /* stale replies of earlier requests */
	if (raw) { /* as it is, however long: the host enforces the limit */
		put_fd((int)fd, raw, str_len(raw));
		put_fd((int)fd, "\n", 1);
	} else {
		put_fd((int)fd, req.buf, req.n);
	}

	long deadline = now_ms() + (long)timeout_s * 1000;
	size_t idlen = str_len(num);
	for (;;) {
		/* one reply line */
		reply.n = 0;
		for (;;) {
			long left = deadline - now_ms();
			struct pollfd_k p = {(int)fd, POLLIN, 0};
			char c;
			long r;
			if (left <= 0) {
				err("no reply within the timeout to: ", raw ? "the raw line" : name);
				quit(2);
			}
			r = sys3(SYS_poll, (long)&p, 1, left);
			if (r == -EINTR || r == 0)
				continue;
			if (r < 0) {
				err("poll failed on ", dev);
				quit(2);
			}
			r = sys3(SYS_read, fd, (long)&c, 1);
			if (r == -EINTR || r == 0)
				continue;
			if (r < 0) {
				err("read failed on ", dev);
				quit(2);
			}
			if (c == '\n')
				break;
			if (reply.n < MAX_LINE - 1)
				reply.buf[reply.n++] = c;
		}
		reply.buf[reply.n] = 0;
		/* "<id> ok[ text]" / "<id> error <message>" */
		char *p = reply.buf;
		if (!raw) {
			size_t k = 0;
			while (k < idlen && p[k] == num[k])
				k++;
			if (k != idlen || p[k] != ' ')
				continue; /* an answer to another request */
		}
		while (*p && *p != ' ')
			p++;
		if (*p == ' ')
			p++;
		if (p[0] == 'o' && p[1] == 'k' && (p[2] == ' ' || p[2] == 0)) {
			p += p[2] ? 3 : 2;
			put_fd(1, p, str_len(p));
			put_fd(1, "\n", 1);
			quit(0);
		}
		if (p[0] == 'e' && p[1] == 'r' && p[2] == 'r' && p[3] == 'o' && p[4] == 'r') {
			p += p[5] ? 6 : 5;
			err("error: ", p);
			quit(1);
		}
		err("unreadable reply: ", reply.buf);
		quit(2);
	}
}

DEFINE_START(request_main);
