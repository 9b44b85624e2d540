/* Raw x86-64 Linux system calls for our freestanding init programs (no libc).
 *
 * Syscall ABI: number in rax, arguments in rdi, rsi, rdx, r10, r8, r9; the
 * instruction clobbers rcx and r11; the result (or -errno) comes back in rax.
 */
#ifndef VMM_INIT_SYS_H
#define VMM_INIT_SYS_H

typedef unsigned long size_t;
typedef long ssize_t;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_nanosleep 35
#define SYS_exit 60
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_ioperm 173
#define SYS_ioctl 16
#define TCSBRK 0x5409 /* with a non-zero argument: tcdrain() */

#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2

#define LINUX_REBOOT_MAGIC1 0xfee1deadUL
#define LINUX_REBOOT_MAGIC2 672274793UL
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedcUL

static inline long sys3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static inline long sys5(long nr, long a, long b, long c, long d, long e)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}

/* String helpers the init programs share (no libc). */
static inline size_t str_len(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

static inline int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

/* The kernel enters init with argc at [rsp], then argv[], NULL, envp[], NULL.
 * _start hands that pointer to init_main() with the stack 16-byte aligned. */
#define DEFINE_START(fn)                                                   \
	__asm__(".text\n"                                                  \
		".global _start\n"                                         \
		"_start:\n"                                                \
		"	mov %rsp, %rdi\n"                                  \
		"	and $-16, %rsp\n"                                  \
		"	call " #fn "\n"                                    \
		"1:	pause\n"                                           \
		"	jmp 1b\n")

#endif
