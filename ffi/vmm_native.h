/*
 * The C core of vmm: shared declarations between the C sources.
 *
 * Python sees these through the cdef in build_native.py; keep both in step.
 */
#ifndef VMM_NATIVE_H
#define VMM_NATIVE_H

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <sys/types.h>
#include <linux/kvm.h>

#define VMM_MAX_VCPUS 256
#define VMM_SERIAL_RING_SIZE 65536 /* power of two */
#define VMM_SNAPSHOT_MSRS 3        /* LSTAR, GS_BASE, KERNEL_GS_BASE */

/* vmm_vcpu_run() results (negative values are -errno of KVM_RUN). */
#define VMM_RUN_EXIT 1    /* a KVM exit Python must handle: see run->exit_reason */
#define VMM_RUN_STOPPED 2 /* vmm_request_stop() was called */

/* vmm_vcpu.activity: what the vCPU thread is doing (for diagnostics). */
#define VMM_ACT_IDLE 0    /* not inside vmm_vcpu_run (Python or not started) */
#define VMM_ACT_RUNNING 1 /* in the loop / KVM_RUN */
#define VMM_ACT_PARKED 2  /* parked in a freeze */

struct vmm_vcpu;

struct vmm_vm {
    int vm_fd;

    /* Freeze rendezvous. All are futex words, accessed with __atomic builtins. */
    uint32_t freeze_gen; /* bumped by each freeze request */
    uint32_t thaw_gen;   /* == freeze_gen once that freeze is thawed */
    uint32_t parked;     /* count of park events (futex word the coordinator sleeps on) */
    uint32_t wake_target; /* parkers wake the coordinator from this count on */
    uint32_t stop;       /* nonzero: every loop returns VMM_RUN_STOPPED */
    uint32_t live;       /* vCPU threads registered (inside a run session) */
    uint64_t thaw_ns;    /* CLOCK_MONOTONIC of the last vmm_thaw (benchmarks) */

    /* COM1 fast path. */
    uint32_t serial_fast;    /* set by the Python 16550 when DLAB=0 and IER.THRI=0 */
    uint32_t serial_lock;    /* tiny spinlock over the ring (several vCPUs may print) */
    uint32_t serial_seq;     /* bumped per append; the pump's futex word */
    uint32_t serial_waiters; /* nonzero while a pump sleeps on serial_seq */
    uint64_t serial_head;    /* total bytes appended */
    uint64_t serial_tail;    /* total bytes drained */
    uint64_t serial_dropped; /* bytes lost because the ring was full */
    uint8_t serial_ring[VMM_SERIAL_RING_SIZE];

    /* Unclaimed ports. With port_filter on, a port exit to a port no device claimed
     * (bit clear in port_claimed) is completed here like an empty ISA bus: reads give
     * all-ones, writes are dropped, and each access is counted in port_misses. Off by
     * default: then every non-fast exit goes to Python. */
    uint32_t port_filter;
    uint8_t port_claimed[65536 / 8];
    uint32_t port_misses[65536];

    int nvcpus;
    struct vmm_vcpu *vcpus[VMM_MAX_VCPUS];
};

struct vmm_vcpu {
    struct vmm_vm *vm;
    int fd;
    int index;
    struct kvm_run *run;
    size_t run_size;

    /* The thread running the loop; guarded by kick_lock so a kick never targets
     * a thread that has ended. */
    uint32_t kick_lock;
    int thread_registered;
    pthread_t thread;
    pid_t tid;
    uint32_t activity;

    uint32_t seen_freeze_gen; /* last freeze generation this vCPU handled */
    uint32_t parked_gen;      /* freeze generation this vCPU is parked for (0 = none) */

    /* Snapshot, captured by the vCPU's own thread while parking. */
    uint32_t snap_gen;
    int snap_error; /* 0 or -errno of the first failing GET ioctl */
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    uint32_t msr_index[VMM_SNAPSHOT_MSRS];
    uint64_t msr_value[VMM_SNAPSHOT_MSRS];
    int nmsrs_captured;

    uint64_t resumed_ns;  /* CLOCK_MONOTONIC when it last left a freeze (benchmarks) */
    uint64_t exits;       /* KVM_RUN returns (all) */
    uint64_t fast_exits;  /* exits handled in C */

    /* Nonzero: this vCPU does not enter the guest (it sleeps in the loop) while the
     * others run; it still parks for a freeze and ends on a stop. The gdb stub holds
     * every vCPU but the one it single-steps. */
    uint32_t hold;
};

/* memory.c */
uint8_t vmm_load_u8(uintptr_t p);
void vmm_store_u8(uintptr_t p, uint8_t v);
uint16_t vmm_load_u16(uintptr_t p);
void vmm_store_u16(uintptr_t p, uint16_t v);
uint32_t vmm_load_u32(uintptr_t p);
void vmm_store_u32(uintptr_t p, uint32_t v);
uint64_t vmm_load_u64(uintptr_t p);
void vmm_store_u64(uintptr_t p, uint64_t v);
uint32_t vmm_fetch_or_u32(uintptr_t p, uint32_t mask);
void vmm_copy_to(uintptr_t dst, const void *src, size_t n);
void vmm_copy_from(void *dst, uintptr_t src, size_t n);
void vmm_release_fence(void);
uintptr_t vmm_map_guest_ram(size_t size, int *err);
int vmm_unmap(uintptr_t addr, size_t size);
int vmm_discard_guest_ram(uintptr_t addr, size_t size);
uint64_t vmm_now_ns(void);

/* vcpu.c */
long vmm_ioctl(int fd, unsigned long request, void *arg);
long vmm_ioctl_int(int fd, unsigned long request, unsigned long arg);
int vmm_install_kick_handler(void);
struct vmm_vm *vmm_vm_new(int vm_fd);
void vmm_claim_ports(struct vmm_vm *vm, uint32_t start, uint32_t count);
void vmm_set_port_filter(struct vmm_vm *vm, int on);
uint32_t vmm_port_misses(struct vmm_vm *vm, uint32_t port);
size_t vmm_port_misses_all(struct vmm_vm *vm, uint32_t *ports, uint32_t *counts, size_t max);
void vmm_vm_free(struct vmm_vm *vm);
struct vmm_vcpu *vmm_vcpu_new(struct vmm_vm *vm, int fd, int index, size_t run_size, int *err);
void vmm_vcpu_free(struct vmm_vcpu *v);
void vmm_vcpu_release_run(struct vmm_vcpu *v);
void vmm_vcpu_thread_enter(struct vmm_vcpu *v);
void vmm_vcpu_thread_exit(struct vmm_vcpu *v);
int vmm_vcpu_run(struct vmm_vcpu *v);
void vmm_vcpu_set_hold(struct vmm_vcpu *v, int on);
void vmm_serial_set_fast(struct vmm_vm *vm, int on);
void vmm_serial_push(struct vmm_vm *vm, const uint8_t *data, uint32_t n);
size_t vmm_serial_drain(struct vmm_vm *vm, uint8_t *buf, size_t n);
size_t vmm_serial_pending(struct vmm_vm *vm);
size_t vmm_serial_wait(struct vmm_vm *vm, int64_t timeout_ns);
void vmm_serial_wake(struct vmm_vm *vm);
uint32_t vmm_freeze_request(struct vmm_vm *vm);
int vmm_parked_count(struct vmm_vm *vm, uint32_t gen);
int vmm_freeze_wait(struct vmm_vm *vm, int expected, int64_t timeout_ns);
void vmm_thaw(struct vmm_vm *vm);
void vmm_request_stop(struct vmm_vm *vm);

#endif
