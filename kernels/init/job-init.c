/* job-init: /init of vmm's guest job (vmm/machine/guestjob.py).
 *
 * A static ELF program without libc, so that the kernel needs nothing beyond
 * CONFIG_BINFMT_ELF to start it (a "#!" script would also need CONFIG_BINFMT_SCRIPT).
 *
 * 1. makes sure fds 0-2 are the console (the kernel opens /dev/console for init;
 *    when it could not, we try once more);
 * 2. mounts proc on /proc, sysfs on /sys, devtmpfs on /dev (each required), tmpfs
 *    on /tmp (optional: without CONFIG_TMPFS /tmp stays on the initramfs) and cgroup2
 *    on /sys/fs/cgroup (optional: a kernel without CONFIG_CGROUPS has no
 *    /sys/fs/cgroup), so a job can place work in cgroups (mkdir /sys/fs/cgroup/x;
 *    echo $$ > /sys/fs/cgroup/x/cgroup.procs; cpusets need CONFIG_CPUSETS and
 *    echo +cpuset > /sys/fs/cgroup/cgroup.subtree_control);
 * 3. runs `/bin/busybox --install -s` (the applets as symlinks);
 * 4. sets up the relay (relay.h): the job's stdout and stderr become a pseudo-terminal
 *    whose lines PID 1 writes to /dev/kmsg, so that the console prints them whole,
 *    never cut by a kernel message (where the kernel lacks what it needs, or
 *    VMM_JOB_STDIO=console is on the command line, a "vmm-job: note" line says so and
 *    the job writes to the console as before);
 * 5. prints "vmm-job: start", runs the command in /vmm/job as `sh -c CMD` through
 *    /bin/busybox with the console as stdin, the relay as stdout and stderr, and
 *    PATH/HOME/TERM set, and reaps every child (PID 1 adopts orphans) until the shell
 *    ends, then copies what is left of its output;
 * 6. prints "vmm-job: exit N" (N: the shell's status, 128+signal when killed) and
 *    reboots (reboot=k on the command line: the i8042 reset ends the VM; the kernel
 *    prints every record still queued before it resets).
 *
 * A step that fails before the job starts prints one machine-readable line and
 * reboots without a status line:
 *
 *     vmm-job: error <what>: -<errno> <ENAME> (CONFIG_<OPTION>)
 *
 * the option being the kernel's that the failure points to, when there is one (a
 * mount that fails with ENODEV: the kernel does not know the filesystem).  The host
 * turns that line into its error (vmm.machine.guestjob.init_failure).
 */
#include "sys.h"
#include "relay.h"

#define SYS_dup2 33
#define SYS_fork 57
#define SYS_execve 59
#define SYS_wait4 61
#define SYS_sync 162

#define ENOENT 2
#define EINTR 4
#define ENODEV 19
#define LINUX_REBOOT_CMD_RESTART 0x01234567UL
#define WNOHANG 1

/* The kernel passes at most MAX_ARG_STRLEN (32 pages) in one argument, NUL included. */
#define MAX_COMMAND (32 * 4096)
#define MAX_ENV 64

static char command[MAX_COMMAND];
static char *environment[MAX_ENV + 4];
static struct relay relay = {.kmsg = -1, .master = -1, .peer = -1};
static char said[256]; /* our own line so far, while the job's output goes to the log */
static size_t said_len;

/* Our own text: to the console, or once the relay is up, a record per line (a line
 * that opens with "\n", to break from a partial line of the job's, needs none there). */
static void put(const char *s)
{
	if (relay.kmsg < 0) {
		sys3(SYS_write, 1, (long)s, (long)str_len(s));
		return;
	}
	for (; *s; s++) {
		if (*s != '\n' && said_len < sizeof(said))
			said[said_len++] = *s;
		if (*s == '\n' && said_len) {
			relay_record(relay.kmsg, said, said_len);
			said_len = 0;
		}
	}
}

static void put_int(long v)
{
	char buf[24];
	int i = sizeof(buf) - 1;
	unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + u % 10);
		u /= 10;
	} while (u && i > 1);
	if (v < 0)
		buf[--i] = '-';
	put(buf + i);
}

/* "\nvmm-job: exit N\n" in one write, so no other console output lands inside it. */
static void put_exit_line(long status)
{
	static const char head[] = "\nvmm-job: exit ";
	char line[sizeof(head) + 24];
	char digits[24];
	size_t n = 0, d = 0;
	unsigned long u = status < 0 ? -(unsigned long)status : (unsigned long)status;

	for (size_t i = 0; head[i]; i++)
		line[n++] = head[i];
	if (status < 0)
		line[n++] = '-';
	do {
		digits[d++] = (char)('0' + u % 10);
		u /= 10;
	} while (u);
	while (d)
		line[n++] = digits[--d];
	line[n++] = '\n';
	line[n] = 0;
	put(line);
}

static const char *errno_name(long err)
{
	switch (-err) {
	case 1: return "EPERM";
	case 2: return "ENOENT";
	case 5: return "EIO";
	case 7: return "E2BIG";
	case 8: return "ENOEXEC";
	case 11: return "EAGAIN";
	case 12: return "ENOMEM";
	case 13: return "EACCES";
	case 14: return "EFAULT";
	case 16: return "EBUSY";
	case 19: return "ENODEV";
	case 20: return "ENOTDIR";
	case 22: return "EINVAL";
	case 24: return "EMFILE";
	case 28: return "ENOSPC";
	case 38: return "ENOSYS";
	case 40: return "ELOOP";
	}
	return "";
}

static void reboot_now(void)
{
	/* Every byte of our last line out of the serial port before the kernel's own
	 * reboot lines ("ACPI: PM: Preparing to enter system sleep state S5"): printk writes
	 * the UART directly, past what the tty still holds, and would cut our line. */
	sys3(SYS_ioctl, 1, TCSBRK, 1);
	sys3(SYS_sync, 0, 0, 0);
	sys5(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0, 0);
	/* Refused (it is not, for PID 1): exit, the kernel panics "Attempted to kill
	 * init", and panic=-1 reboots. */
	sys3(SYS_exit, 1, 0, 0);
}

/* "vmm-job: error WHAT: -N ENAME (OPTION)", then the end of the VM. */
static void fail(const char *what, long err, const char *option)
{
	put("\nvmm-job: error ");
	put(what);
	put(": ");
	put_int(err);
	if (*errno_name(err)) {
		put(" ");
		put(errno_name(err));
	}
	if (option) {
		put(" (");
		put(option);
		put(")");
	}
	put("\n");
	reboot_now();
}

static void console(void)
{
	long fd;

	if (sys3(SYS_write, 1, (long)"", 0) >= 0)
		return; /* the kernel gave us /dev/console */
	fd = sys3(SYS_open, (long)"/dev/console", O_RDWR, 0);
	if (fd < 0)
		return; /* no console (the kernel said "unable to open an initial console") */
	for (long i = 0; i < 3; i++)
		if (fd != i)
			sys3(SYS_dup2, fd, i, 0);
	if (fd > 2)
		sys3(SYS_close, fd, 0, 0);
}

struct mount_point {
	const char *source, *target, *type, *option, *what;
	int required;
	const char *without; /* an optional mount's consequence, said when it fails */
};

static const struct mount_point mounts[] = {
	{"proc", "/proc", "proc", "CONFIG_PROC_FS", "mount proc on /proc", 1, 0},
	{"sysfs", "/sys", "sysfs", "CONFIG_SYSFS", "mount sysfs on /sys", 1, 0},
	{"devtmpfs", "/dev", "devtmpfs", "CONFIG_DEVTMPFS", "mount devtmpfs on /dev", 1, 0},
	{"tmpfs", "/tmp", "tmpfs", "CONFIG_TMPFS", "mount tmpfs on /tmp", 0,
	 "/tmp stays on the initramfs"},
	/* after sysfs: the kernel makes /sys/fs/cgroup (ENOENT without CONFIG_CGROUPS) */
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", "CONFIG_CGROUPS", "mount cgroup2 on /sys/fs/cgroup",
	 0, "no cgroups in this job"},
};

static void mount_all(void)
{
	for (size_t i = 0; i < sizeof(mounts) / sizeof(mounts[0]); i++) {
		const struct mount_point *m = &mounts[i];
		long r = sys5(SYS_mount, (long)m->source, (long)m->target, (long)m->type, 0, 0);
		/* ENODEV: the kernel does not know the filesystem type: it was built without it. */
		/* ENOENT under /sys: the kernel made no such mount point (cgroup2 without
		 * CONFIG_CGROUPS). */
		const char *option =
			r == -ENODEV || (r == -ENOENT && starts_with(m->target, "/sys/")) ? m->option : 0;

		if (r >= 0)
			continue;
		if (m->required)
			fail(m->what, r, option);
		put("vmm-job: note ");
		put(m->what);
		put(": ");
		put_int(r);
		put(option ? " (" : "");
		put(option ? option : "");
		put(option ? ")" : "");
		put("; ");
		put(m->without);
		put("\n");
	}
}

/* Wait for `pid`, reaping any other child on the way; its wait status, or -errno. */
static long reap_until(long pid)
{
	for (;;) {
		int status = 0;
		long r = sys5(SYS_wait4, -1, (long)&status, 0, 0, 0);
		if (r == -EINTR)
			continue;
		if (r < 0)
			return r;
		if (r == pid)
			return status;
	}
}

/* fork + execve(path, argv, environment), `setup` run in the child first; the child's
 * pid, or fail(). */
static long start(const char *what, const char *path, char *const argv[], void (*setup)(void))
{
	long pid = sys3(SYS_fork, 0, 0, 0);

	if (pid < 0)
		fail(what, pid, 0);
	if (pid == 0) {
		long r;
		if (setup)
			setup();
		r = sys3(SYS_execve, (long)path, (long)argv, (long)environment);
		put("\nvmm-job: error execve ");
		put(path);
		put(": ");
		put_int(r);
		put(" ");
		put(errno_name(r));
		put("\n");
		sys3(SYS_exit, 127, 0, 0);
	}
	return pid;
}

/* start() with the init's own stdio, then its wait status, or fail(). */
static long run(const char *what, const char *path, char *const argv[])
{
	return reap_until(start(what, path, argv, 0));
}

/* The kernel's environment for init (HOME=/, TERM=linux, unknown command-line words
 * with "="), with PATH, HOME and TERM set as the job expects. */
static void make_environment(char **envp)
{
	size_t n = 0;

	for (; envp && *envp && n < MAX_ENV; envp++)
		if (!starts_with(*envp, "PATH=") && !starts_with(*envp, "HOME=") &&
		    !starts_with(*envp, "TERM="))
			environment[n++] = *envp;
	environment[n++] = "PATH=/bin:/sbin:/usr/bin:/usr/sbin";
	environment[n++] = "HOME=/";
	environment[n++] = "TERM=dumb";
	environment[n] = 0;
}

/* /vmm/job into command[], trailing newlines dropped (as "$(cat /vmm/job)" would). */
static void read_command(void)
{
	long fd = sys3(SYS_open, (long)"/vmm/job", O_RDONLY, 0);
	size_t len = 0;
	long got;

	if (fd < 0)
		fail("open /vmm/job", fd, 0);
	while ((got = sys3(SYS_read, fd, (long)command + len, sizeof(command) - 1 - len)) > 0)
		len += (size_t)got;
	if (got < 0)
		fail("read /vmm/job", got, 0);
	if (len >= sizeof(command) - 1) {
		put("\nvmm-job: error read /vmm/job: the command is longer than the kernel passes "
		    "in one argument (131071 bytes)\n");
		reboot_now();
	}
	sys3(SYS_close, fd, 0, 0);
	while (len && command[len - 1] == '\n')
		len--;
	command[len] = 0;
}

/* The job's side of the relay as stdout and stderr of the child about to exec. */
static void job_stdio(void)
{
	if (relay.peer < 0)
		return;
	sys3(SYS_dup2, relay.peer, 1, 0);
	sys3(SYS_dup2, relay.peer, 2, 0);
	sys3(SYS_close, relay.peer, 0, 0);
}

struct job {
	long pid, status; /* status: the wait status once reaped, else -1 */
};

/* Reaps what has ended (PID 1 adopts orphans); true once the job's shell has. */
static int job_done(void *arg)
{
	struct job *job = arg;

	while (job->status < 0) {
		int status = 0;
		long r = sys5(SYS_wait4, -1, (long)&status, WNOHANG, 0, 0);
		if (r == -EINTR)
			continue;
		if (r < 0)
			fail("wait for the job", r, 0);
		if (r == 0)
			break;
		if (r == job->pid)
			job->status = status;
	}
	return job->status >= 0;
}

/* The relay, or why the job writes to the console instead. */
static void relay_start(char **envp)
{
	const char *why = 0;

	for (; envp && *envp && !why; envp++)
		if (starts_with(*envp, "VMM_JOB_STDIO=console"))
			why = "VMM_JOB_STDIO=console asks for it";
	if (!why)
		why = relay_open(&relay);

	if (!why)
		return;
	if (relay.master >= 0)
		sys3(SYS_close, relay.master, 0, 0);
	if (relay.peer >= 0)
		sys3(SYS_close, relay.peer, 0, 0);
	relay.master = relay.peer = relay.kmsg = -1;
	put("vmm-job: note the job writes to the console, where a kernel message can cut its "
	    "lines: ");
	put(why);
	put("\n");
}

void init_main(long *sp)
{
	long argc = sp[0];
	char **envp = (char **)(sp + 1 + argc + 1);
	char *install[] = {"/bin/busybox", "--install", "-s", 0};
	char *shell[] = {"sh", "-c", command, 0};
	struct job job = {0, -1};
	long status;

	console();
	make_environment(envp);
	mount_all();
	status = run("fork for busybox --install", "/bin/busybox", install);
	if (status != 0) {
		put("\nvmm-job: error /bin/busybox --install -s: wait status ");
		put_int(status);
		put("\n");
		reboot_now();
	}
	read_command();
	relay_start(envp);
	put("vmm-job: start\n");
	if (relay.kmsg < 0) {
		status = run("fork for the job", "/bin/busybox", shell);
	} else {
		job.pid = start("fork for the job", "/bin/busybox", shell, job_stdio);
		sys3(SYS_close, relay.peer, 0, 0); /* the job's side: EIO here once it is gone */
		relay_run(&relay, job_done, &job);
		status = job.status;
	}
	if (status < 0)
		fail("wait for the job", status, 0);
	status = (status & 0x7f) ? 128 + (status & 0x7f) : (status >> 8) & 0xff;
	put_exit_line(status);
	reboot_now();
}

DEFINE_START(init_main);
