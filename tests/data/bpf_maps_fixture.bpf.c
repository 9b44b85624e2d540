/* A BPF object's maps and globals, compiled with `clang -g -target bpf -c` by
 * tests/test_bpf_maps.py for its .BTF: the map BTF the kernel keeps for a loaded
 * object (libbpf's DATASEC fix-up is redone by the test). Declarations only: nothing
 * here runs. The map definitions follow libbpf's BTF-defined map convention. */
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define SEC(name) __attribute__((section(name), used))

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef signed short s16;
typedef unsigned char u8;

enum qmode { QMODE_FIFO = 1, QMODE_PRIO = 7 };

struct stats {
	u64 nr_enq;
	u32 nr_deq;
	int delta;
	char tag[8];
	u8 flag:1, mode:3;
	u16 small;
	enum qmode qm;
	_Bool on;
	u32 hist[3];
};

struct pcpu_ctr {
	u64 cnt;
	u32 seen;
};

struct {
	__uint(type, 2);		/* BPF_MAP_TYPE_ARRAY */
	__uint(max_entries, 4);
	__type(key, u32);
	__type(value, struct stats);
} stats_map SEC(".maps");

struct {
	__uint(type, 6);		/* BPF_MAP_TYPE_PERCPU_ARRAY */
	__uint(max_entries, 2);
	__type(key, u32);
	__type(value, struct pcpu_ctr);
} pcpu_map SEC(".maps");

u64 nr_enqueued;
char mode_name[6];
u32 dispatched[3];
int nr_cpus = 2;
s16 offset_ns = -5;
const volatile u32 slice_us = 20000;
