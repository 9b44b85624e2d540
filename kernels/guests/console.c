/*
 * COM1 output, report-port records and exit. Only port I/O: callable from ring 0 and
 * from ring 3 (which runs with IOPL 3).
 */
#include "guest.h"

/* Serialises whole lines between CPUs; xchg is emulated fine in ring 0 under PVM. */
static volatile u32 console_lock;

static void lock_console(void)
{
	while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
}

static void unlock_console(void)
{
	__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

void putc_serial(char c)
{
	/* Poll "transmit holding register empty" like a driver; bounded so a VMM
	 * without a UART (all-ones reads) cannot hang us. */
	for (u32 i = 0; i < 1000 && !(inb(COM1_LSR) & LSR_THRE); i++)
		cpu_relax();
	outb(COM1_PORT, (u8)c);
}

static void puts_unlocked(const char *s)
{
	while (*s)
		putc_serial(*s++);
}

void puts_serial(const char *s)
{
	lock_console();
	puts_unlocked(s);
	unlock_console();
}

static void hex_unlocked(u64 v)
{
	char buf[19];
	int i = 18;
	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts_unlocked(&buf[i]);
}

static void dec_unlocked(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts_unlocked(&buf[i]);
}

void put_hex(u64 v) { lock_console(); hex_unlocked(v); unlock_console(); }
void put_dec(u64 v) { lock_console(); dec_unlocked(v); unlock_console(); }

/*
 * printk-lite: one line printed atomically with respect to other CPUs.
 * Format letters: %s string, %d unsigned decimal, %x hex (0x-prefixed), %c char.
 */
void printf_serial(const char *fmt, ...)
{
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	lock_console();
	for (; *fmt; fmt++) {
		if (*fmt != '%' || !fmt[1]) {
			putc_serial(*fmt);
			continue;
		}
		switch (*++fmt) {
		case 's': puts_unlocked(__builtin_va_arg(ap, const char *)); break;
		case 'd': dec_unlocked(__builtin_va_arg(ap, u64)); break;
		case 'x': hex_unlocked(__builtin_va_arg(ap, u64)); break;
		case 'c': putc_serial((char)__builtin_va_arg(ap, int)); break;
		default: putc_serial('%'); putc_serial(*fmt); break;
		}
	}
	unlock_console();
	__builtin_va_end(ap);
}

void report(u32 type, const u32 *payload, u32 len)
{
	outl(REPORT_PORT, REC_HEADER(type, len));
	for (u32 i = 0; i < len; i++)
		outl(REPORT_PORT, payload[i]);
}

__attribute__((noreturn)) void guest_exit(u32 code)
{
	outl(EXIT_PORT, code);
	/* No exit device: fall back to a keyboard-controller reset, then spin. */
	outb(I8042_CMD_PORT, I8042_RESET);
	for (;;)
		cpu_relax();
}
