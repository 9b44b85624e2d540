/* Shared definitions of the freestanding test guest (see README.md for the ABI). */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;
typedef unsigned long size_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

/* Layout constants shared with head.S and guest.ld. */
#include "layout.h"

/* ---- ports (vmm/machine/layout.py port map) ---- */
#define COM1_PORT 0x3f8
#define COM1_LSR (COM1_PORT + 5)
#define LSR_THRE 0x20           /* transmit holding register empty */
#define LSR_DR 0x01             /* received data ready */
#define COM2_PORT 0x2f8         /* requests to the host (vmm/runtime/requests.py) */
#define COM2_LSR (COM2_PORT + 5)
#define EXIT_PORT 0xf4
#define REPORT_PORT 0x600
#define OUTLOOP_DEFAULT_PORT 0x601
#define I8042_CMD_PORT 0x64
#define I8042_RESET 0xfe

/* ---- exit codes ---- */
#define EXIT_EXCEPTION 0x7f     /* an unexpected CPU exception */
#define EXIT_BAD_CMDLINE 0x7e   /* unknown mode= or a malformed option */
#define EXIT_AP_TIMEOUT 0x7d    /* an AP did not come up */
#define EXIT_NOT_REACHED 0x7c   /* mode=reset/triple/badinsn did not do its job */

/* ---- report-port records: header word then `len` payload words ---- */
#define REC_MAGIC 0xa5000000u
#define REC_HEADER(type, len) (REC_MAGIC | ((u32)(type) << 8) | (u32)(len))
enum report_type {
	REC_BOOT = 0x01,      /* [boot_protocol, nr_cpus, ring, mode] */
	REC_READY = 0x02,     /* [cpu, ring] */
	REC_OBS = 0x03,       /* [cpu, flags, clock_lo, clock_hi, count_lo, count_hi, event] */
	REC_SUMMARY = 0x04,   /* [cpu, counter_lo, counter_hi, obs_events, obs_inconsistent,
	                          torn_reads, hot_word, probe_lo, probe_hi] */
	REC_HOT = 0x05,       /* [cpu, hot_word after its last own bit] */
	REC_EXCEPTION = 0x06, /* [vector, error_code, rip_lo, rip_hi, cpu, cs] */
	REC_UTS = 0x07,       /* [len, 17 words: nodename bytes, NUL padded] */
	REC_OUTLOOP = 0x08,   /* [n_lo, n_hi, ring] before the first write of mode=outloop */
	REC_CMD = 0x09,       /* [cpu, command word] when a CPU acts on guest_command */
};

/* ---- guest_command (written by the host, see README) ---- */
#define CMD_NONE 0
#define CMD_UTS 1       /* BSP prints and reports init_uts_ns.name.nodename */
#define CMD_SUMMARY 2   /* every CPU sends a REC_SUMMARY record and goes on */
#define CMD_STOP 3      /* every CPU sends REC_SUMMARY and stops; exit code = bits 8..15 */

/* ---- port I/O (works in ring 0 and, with IOPL=3, in ring 3) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* console.c: everything here is ring-independent (port I/O only) */
void putc_serial(char c);
void puts_serial(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);
void printf_serial(const char *fmt, ...);
void report(u32 type, const u32 *payload, u32 len);
void report_u64(u64 v);
__attribute__((noreturn)) void guest_exit(u32 code);

/* lib.c */
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* cmdline.c */
#define COMMAND_LINE_SIZE 2048
extern char boot_command_line[COMMAND_LINE_SIZE];
void cmdline_copy(const char *src);
bool cmdline_get(const char *key, char *val, size_t size);
u64 cmdline_u64(const char *key, u64 dflt);

/* cpu.c: descriptor tables and CPU state */
void cpu_tables_init(u32 nr_cpus);
void cpu_load_tables(u32 cpu);
__attribute__((noreturn)) void enter_ring3(void (*fn)(u64), u64 arg, u64 user_stack_top);
void trap_handler(u64 *frame);
u64 kernel_stack_top(u32 cpu);
u64 user_stack_top(u32 cpu);

/* smp.c */
extern volatile u32 ap_started;
void smp_boot_aps(u32 nr_cpus);

/* work.c */
struct work_params;
__attribute__((noreturn)) void cpu_work_start(u32 cpu);
void percpu_setup(u32 nr_cpus, u32 nr_possible);

/* main.c */
extern u32 boot_protocol;
extern u32 guest_ring;
extern u32 guest_nr_cpus;
extern u32 guest_exit_code;

/* entry symbols from head.S */
extern char ap_trampoline_start[], ap_trampoline_end[];
extern char boot_stack_top[];



/* Parameters of the work loop, set by the BSP before any CPU enters it. */
struct work_params {
	u32 nr_cpus;
	u32 ring;          /* 0 or 3 */
	u64 loops;         /* iterations per CPU, 0 = until CMD_STOP */
	u64 tick;          /* iterations per tick, a power of two */
	u64 hot_every;     /* ticks between two hot_word bits of one CPU */
	u32 exit_code;     /* exit code when loop=N finishes */
};
extern struct work_params work_params;
#endif
