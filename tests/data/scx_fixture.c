/* sched_ext's state as Linux 7.3 declares it (kernel/sched/ext/internal.h, ext.c), cut
 * down to what vmm.kernel.scx_state reads, with padding standing in for the rest: the
 * names, types and kinds are the kernel's, the offsets are not (tests take them from BTF).
 * -DGLOBAL_WATCHDOG: the 6.16-like variant whose watchdog timeout is the global
 * scx_watchdog_timeout instead of a member of struct scx_sched.
 * Built by tests/test_scx_state.py with gcc -g, ld -T kfixture.ld, then pahole -J. */
typedef int s32;
typedef unsigned int u32;
typedef long long s64;
typedef unsigned long long u64;
typedef struct { int counter; } atomic_t;

enum scx_public_consts { SCX_OPS_NAME_LEN = 128 };
enum scx_consts { SCX_EXIT_BT_LEN = 64, SCX_EXIT_MSG_LEN = 1024 };

enum scx_exit_kind {
	SCX_EXIT_NONE,
	SCX_EXIT_DONE,
	SCX_EXIT_UNREG = 64,
	SCX_EXIT_UNREG_BPF,
	SCX_EXIT_UNREG_KERN,
	SCX_EXIT_SYSRQ,
	SCX_EXIT_PARENT,
	SCX_EXIT_PARENT_KILL,
	SCX_EXIT_ERROR = 1024,
	SCX_EXIT_ERROR_BPF,
	SCX_EXIT_ERROR_STALL,
	SCX_EXIT_ERROR_REENQ,
	SCX_EXIT_ERROR_RESCUE,
};

enum scx_enable_state { SCX_ENABLING, SCX_ENABLED, SCX_DISABLING, SCX_DISABLED };

struct scx_exit_info {
	enum scx_exit_kind kind;
	s32 exit_cpu;
	s64 exit_code;
	u64 flags;
	const char *reason;
	unsigned long *bt;
	u32 bt_len;
	char *msg;
	char *dump;
};

struct sched_ext_ops {
	void *callbacks[40];
	u64 flags;
	u32 timeout_ms;
	u32 exit_dump_len;
	u64 hotplug_seq;
	char name[SCX_OPS_NAME_LEN];
};

struct scx_sched {
	struct sched_ext_ops ops;
	unsigned long has_op[2];
	void *dsq_hash[6];
	u64 slice_dfl;
	unsigned long id;
#ifndef GLOBAL_WATCHDOG
	unsigned long watchdog_timeout;
#endif
	atomic_t exit_kind;
	struct scx_exit_info *exit_info;
	void *tail[16];
};

struct scx_sched *scx_root;
static atomic_t scx_enable_state_var = { SCX_DISABLED };
#ifdef GLOBAL_WATCHDOG
static unsigned long scx_watchdog_timeout;
#endif

/* Keeps the statics and the enums in the symbol table and in BTF. */
enum scx_enable_state scx_enable_state(void) { return scx_enable_state_var.counter; }
enum scx_exit_kind scx_exit_kind_of(struct scx_exit_info *ei) { return ei->kind; }
int scx_consts_used(enum scx_consts c, enum scx_public_consts p) { return c + p; }
#ifdef GLOBAL_WATCHDOG
unsigned long scx_watchdog(void) { return scx_watchdog_timeout; }
#endif
void _start(void) {}
