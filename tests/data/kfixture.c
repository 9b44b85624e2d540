/* Test fixture for vmm.kernel: types exercising every BTF layout feature we resolve.
 * Built by tests/data/kfixture.py with gcc -g, then pahole -J adds .BTF. */
struct inner { int a; char b; };

struct bits {
	unsigned int x : 3;
	unsigned int y : 5;
	unsigned long z : 40;
	signed int s : 4;
	unsigned char c;
};

enum color { RED, GREEN = 5, BLUE = -2 };
enum wide { WIDE_SMALL = 1, WIDE_BIG = 0x100000000ULL };

struct outer {
	long first;
	union {
		int u_int;
		struct { short lo; short hi; };
	};
	struct inner arr[4];
	struct bits bf;
	struct inner *ptr;
	const volatile int cv;
	enum color col;
	int matrix[2][3];
	void (*fn)(int, char *);
	char tail[5];
};
typedef struct outer outer_t;
typedef const outer_t couter_t;

struct scx_rq_fx { unsigned long pad; unsigned int flags; unsigned long clock; };
struct rq_fx { int cpu; struct scx_rq_fx scx; union { float f; double d; } num; };

__attribute__((section(".data..percpu"))) struct rq_fx runqueues_fx = { .cpu = 7 };
__attribute__((section(".data..percpu"))) unsigned long pcpu_counter_fx;
struct outer global_outer = { .first = 42 };
couter_t *use_typedef;
enum wide use_wide;
unsigned long __per_cpu_offset[4];
unsigned int nr_cpu_ids = 4;
unsigned long phys_base;
/* CONFIG_RANDOMIZE_MEMORY's variables, with their unrandomized values. */
unsigned long page_offset_base = 0xffff888000000000UL;
unsigned long vmalloc_base = 0xffffc90000000000UL;
unsigned long vmemmap_base = 0xffffea0000000000UL;
__attribute__((section(".data..percpu"))) unsigned long this_cpu_off;
char linux_banner[] = "Linux version fixture (vmm tests)";

void entry_SYSCALL_64(void) { }
int fixture_func(struct outer *o, int n) { return o->arr[n].a + use_wide; }
static int int3_selftest(void) { return fixture_func(&global_outer, 1) * 3; }
int _start(void) { entry_SYSCALL_64(); return int3_selftest(); }
