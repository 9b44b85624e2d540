/*
 * KVM ioctl wrapper, the vCPU run loop, the COM1 fast path and the freeze
 * rendezvous.
 *
 * Python calls vmm_vcpu_run() from a vCPU thread (cffi releases the GIL). The loop
 * stays in C for everything that must not cost a Python call (EINTR/EAGAIN retries,
 * COM1 output, freeze parking) and returns when Python must act.
 *
 * Freeze protocol (one VM-wide control block, futex words):
 *   coordinator: freeze_gen++; fence; immediate_exit=1 on every vCPU; kick each thread.
 *   vCPU (handle_freeze, on its own thread): drain with one KVM_RUN (immediate_exit
 *   still 1, completes a half-done port/MMIO exit, returns EINTR), capture regs, sregs,
 *   MSRs, publish parked_gen, parked++ and FUTEX_WAKE; FUTEX_WAIT until thaw_gen
 *   reaches its generation; then immediate_exit=0, fence, and re-check freeze_gen
 *   before the next KVM_RUN, so a freeze requested right after a thaw is never lost.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vmm_native.h"

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

#define COM1_THR 0x3f8
#define COM1_LSR 0x3fd
#define LSR_THRE_TEMT 0x60

/* ---------------------------------------------------------------- ioctl, futex */

/* Every ioctl returns its result or -errno, never a bare -1. */
long vmm_ioctl(int fd, unsigned long request, void *arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

long vmm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static long futex_wait(uint32_t *word, uint32_t expected, const struct timespec *rel)
{
    return syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, rel, NULL, 0);
}

static void futex_wake(uint32_t *word, int n)
{
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static void spin_lock(uint32_t *l)
{
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            __builtin_ia32_pause();
}

static void spin_unlock(uint32_t *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------- kick signal */

static int kick_signal;

static void kick_handler(int sig) { (void)sig; /* only interrupts KVM_RUN / futex */ }

/* Installed once, from C, WITHOUT SA_RESTART so a blocked KVM_RUN returns EINTR.
 * A Python signal handler would not do: those run only on the main thread. */
int vmm_install_kick_handler(void)
{
    if (kick_signal)
        return kick_signal;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    int sig = SIGRTMIN + 2;
    if (sigaction(sig, &sa, NULL) < 0)
        return -errno;
    kick_signal = sig;
    return sig;
}

static void kick(struct vmm_vcpu *v)
{
    spin_lock(&v->kick_lock);
    if (v->thread_registered)
        pthread_kill(v->thread, kick_signal);
    spin_unlock(&v->kick_lock);
}

/* ---------------------------------------------------------------- objects */

struct vmm_vm *vmm_vm_new(int vm_fd)
{
    if (vmm_install_kick_handler() < 0)
        return NULL;
    struct vmm_vm *vm = calloc(1, sizeof(*vm));
    if (vm)
        vm->vm_fd = vm_fd;
    return vm;
}

/* Unmaps the vCPU's kvm_run page once its thread has ended: the mapping holds a
 * reference on the VM in the kernel, which otherwise outlives close() (with its
 * kvm-nx-lpage-recovery thread) until the control block is freed. */
void vmm_vcpu_release_run(struct vmm_vcpu *v)
{
    spin_lock(&v->kick_lock); /* against interrupt_all() in another thread */
    struct kvm_run *run = v->run;
    v->run = NULL;
    spin_unlock(&v->kick_lock);
    if (run)
        munmap(run, v->run_size);
}

/* Frees the control block and every vCPU block still in it (their kvm_run mappings
 * too). Python attaches this to the block with ffi.gc, so it runs only when the last
 * object that can reach the block (Vm, Vcpu, VcpuThread, FreezeCoordinator,
 * ConsolePump) is gone: nothing can use a freed block. */
void vmm_vm_free(struct vmm_vm *vm)
{
    if (!vm)
        return;
    for (int i = 0; i < vm->nvcpus; i++) {
        struct vmm_vcpu *v = vm->vcpus[i];
        if (v) {
            vm->vcpus[i] = NULL;
            vmm_vcpu_release_run(v);
            free(v);
        }
    }
    free(vm);
}

/* Maps the vCPU's kvm_run page. NULL + *err (errno) on failure. */
struct vmm_vcpu *vmm_vcpu_new(struct vmm_vm *vm, int fd, int index, size_t run_size, int *err)
{
    if (vm->nvcpus >= VMM_MAX_VCPUS) {
        *err = ENOSPC;
        return NULL;
    }
    struct vmm_vcpu *v = calloc(1, sizeof(*v));
    if (!v) {
        *err = ENOMEM;
        return NULL;
    }
    void *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED) {
        *err = errno;
        free(v);
        return NULL;
    }
    v->vm = vm;
    v->fd = fd;
    v->index = index;
    v->run = run;
    v->run_size = run_size;
    v->msr_index[0] = 0xc0000082; /* LSTAR */
    v->msr_index[1] = 0xc0000101; /* GS_BASE */
    v->msr_index[2] = 0xc0000102; /* KERNEL_GS_BASE */
    /* A vCPU created while a freeze is in progress must not park for it. */
    v->seen_freeze_gen = LOAD(&vm->freeze_gen);
    vm->vcpus[vm->nvcpus] = v;
    STORE(&vm->nvcpus, vm->nvcpus + 1);
    *err = 0;
    return v;
}

/* Only once its thread has ended and nothing refers to it any more; the project
 * lets vmm_vm_free do it instead. */
void vmm_vcpu_free(struct vmm_vcpu *v)
{
    struct vmm_vm *vm = v->vm;
    for (int i = 0; i < vm->nvcpus; i++)
        if (vm->vcpus[i] == v)
            vm->vcpus[i] = NULL; /* slot stays, coordinator skips NULL */
    vmm_vcpu_release_run(v);
    free(v);
}

/* Called from the vCPU thread before its first vmm_vcpu_run. */
void vmm_vcpu_thread_enter(struct vmm_vcpu *v)
{
    spin_lock(&v->kick_lock);
    v->thread = pthread_self();
    v->tid = (pid_t)syscall(SYS_gettid);
    v->thread_registered = 1;
    spin_unlock(&v->kick_lock);
    __atomic_add_fetch(&v->vm->live, 1, __ATOMIC_SEQ_CST);
}

/* Called from the vCPU thread when it ends: no kick targets it afterwards, and a
 * coordinator waiting for it stops waiting. */
void vmm_vcpu_thread_exit(struct vmm_vcpu *v)
{
    spin_lock(&v->kick_lock);
    v->thread_registered = 0;
    spin_unlock(&v->kick_lock);
    STORE(&v->activity, VMM_ACT_IDLE);
    __atomic_sub_fetch(&v->vm->live, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&v->vm->parked, 1, __ATOMIC_SEQ_CST);
    futex_wake(&v->vm->parked, INT_MAX);
}

/* ---------------------------------------------------------------- COM1 fast path */

static void serial_append(struct vmm_vm *vm, const uint8_t *data, uint32_t n)
{
    spin_lock(&vm->serial_lock);
    for (uint32_t i = 0; i < n; i++) {
        if (vm->serial_head - vm->serial_tail >= VMM_SERIAL_RING_SIZE) {
            vm->serial_dropped++;
            continue;
        }
        vm->serial_ring[vm->serial_head & (VMM_SERIAL_RING_SIZE - 1)] = data[i];
        vm->serial_head++;
    }
    spin_unlock(&vm->serial_lock);
    __atomic_add_fetch(&vm->serial_seq, 1, __ATOMIC_SEQ_CST);
    /* Only wake when a pump sleeps: no syscall per byte while it is busy. */
    if (LOAD(&vm->serial_waiters) && __atomic_exchange_n(&vm->serial_waiters, 0, __ATOMIC_SEQ_CST))
        futex_wake(&vm->serial_seq, INT_MAX);
}

/* Python appends bytes too when the 16550 takes the slow path, keeping one order. */
void vmm_serial_push(struct vmm_vm *vm, const uint8_t *data, uint32_t n) { serial_append(vm, data, n); }

size_t vmm_serial_drain(struct vmm_vm *vm, uint8_t *buf, size_t n)
{
    size_t got = 0;
    spin_lock(&vm->serial_lock);
    while (got < n && vm->serial_tail != vm->serial_head) {
        buf[got++] = vm->serial_ring[vm->serial_tail & (VMM_SERIAL_RING_SIZE - 1)];
        vm->serial_tail++;
    }
    spin_unlock(&vm->serial_lock);
    return got;
}

size_t vmm_serial_pending(struct vmm_vm *vm)
{
    spin_lock(&vm->serial_lock);
    size_t n = vm->serial_head - vm->serial_tail;
    spin_unlock(&vm->serial_lock);
    return n;
}

/* Pump side: sleep until the ring has data, the timeout passes or vmm_serial_wake().
 * Returns the number of pending bytes. */
size_t vmm_serial_wait(struct vmm_vm *vm, int64_t timeout_ns)
{
    uint32_t seq = LOAD(&vm->serial_seq);
    STORE(&vm->serial_waiters, 1);
    size_t pending = vmm_serial_pending(vm);
    if (pending == 0) {
        struct timespec rel, *prel = NULL;
        if (timeout_ns >= 0) {
            rel.tv_sec = timeout_ns / 1000000000;
            rel.tv_nsec = timeout_ns % 1000000000;
            prel = &rel;
        }
        futex_wait(&vm->serial_seq, seq, prel);
        pending = vmm_serial_pending(vm);
    }
    return pending;
}

/* Wakes a sleeping pump (used to shut it down). */
void vmm_serial_wake(struct vmm_vm *vm)
{
    __atomic_add_fetch(&vm->serial_seq, 1, __ATOMIC_SEQ_CST);
    futex_wake(&vm->serial_seq, INT_MAX);
}

void vmm_serial_set_fast(struct vmm_vm *vm, int on) { STORE(&vm->serial_fast, on ? 1u : 0u); }

void vmm_claim_ports(struct vmm_vm *vm, uint32_t start, uint32_t count)
{
    for (uint32_t p = start; p < start + count && p < 65536; p++)
        vm->port_claimed[p >> 3] |= (uint8_t)(1u << (p & 7));
}

void vmm_set_port_filter(struct vmm_vm *vm, int on) { STORE(&vm->port_filter, on ? 1u : 0u); }

uint32_t vmm_port_misses(struct vmm_vm *vm, uint32_t port)
{
    return port < 65536 ? LOAD(&vm->port_misses[port]) : 0;
}

/* The nonzero miss counters, for reports: fills up to max (port, count) pairs. */
size_t vmm_port_misses_all(struct vmm_vm *vm, uint32_t *ports, uint32_t *counts, size_t max)
{
    size_t n = 0;
    for (uint32_t p = 0; p < 65536 && n < max; p++) {
        uint32_t c = LOAD(&vm->port_misses[p]);
        if (c) {
            ports[n] = p;
            counts[n++] = c;
        }
    }
    return n;
}

/* An exit to a port nobody claimed, completed without Python. 1 if handled. */
static int io_unclaimed(struct vmm_vcpu *v)
{
    struct kvm_run *run = v->run;
    struct vmm_vm *vm = v->vm;
    uint16_t port = run->io.port;
    if (!LOAD(&vm->port_filter) || (vm->port_claimed[port >> 3] >> (port & 7)) & 1)
        return 0;
    if (run->io.direction == KVM_EXIT_IO_IN)
        memset((uint8_t *)run + run->io.data_offset, 0xff, (size_t)run->io.size * run->io.count);
    __atomic_add_fetch(&vm->port_misses[port], run->io.count, __ATOMIC_RELAXED);
    return 1;
}

/* Handles a port exit in C when it is COM1 data or LSR in fast mode. 1 if handled. */
static int io_fast_path(struct vmm_vcpu *v)
{
    struct kvm_run *run = v->run;
    if (!LOAD(&v->vm->serial_fast) || run->io.size != 1)
        return 0;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == COM1_THR) {
        serial_append(v->vm, data, run->io.count);
        return 1;
    }
    if (run->io.direction == KVM_EXIT_IO_IN && run->io.port == COM1_LSR) {
        memset(data, LSR_THRE_TEMT, run->io.count);
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- freeze */

static void capture_snapshot(struct vmm_vcpu *v, uint32_t gen)
{
    long r;
    int err = 0;
    r = vmm_ioctl(v->fd, KVM_GET_REGS, &v->regs);
    if (r < 0 && !err)
        err = (int)r;
    r = vmm_ioctl(v->fd, KVM_GET_SREGS, &v->sregs);
    if (r < 0 && !err)
        err = (int)r;
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[VMM_SNAPSHOT_MSRS];
    } msrs;
    memset(&msrs, 0, sizeof(msrs));
    msrs.hdr.nmsrs = VMM_SNAPSHOT_MSRS;
    for (int i = 0; i < VMM_SNAPSHOT_MSRS; i++)
        msrs.e[i].index = v->msr_index[i];
    r = vmm_ioctl(v->fd, KVM_GET_MSRS, &msrs);
    if (r < 0) {
        if (!err)
            err = (int)r;
        r = 0;
    }
    v->nmsrs_captured = (int)r;
    for (int i = 0; i < VMM_SNAPSHOT_MSRS; i++)
        v->msr_value[i] = i < r ? msrs.e[i].data : 0;
    v->snap_error = err;
    STORE(&v->snap_gen, gen);
}

/* Runs on the vCPU thread. Returns 1 when a stop was requested while parked. */
static int handle_freeze(struct vmm_vcpu *v, uint32_t gen)
{
    struct vmm_vm *vm = v->vm;
    v->seen_freeze_gen = gen;
    if ((int32_t)(LOAD(&vm->thaw_gen) - gen) >= 0)
        return 0; /* already thawed (we were busy in Python the whole time) */

    /* Drain: immediate_exit is 1, so this completes any half-done port/MMIO exit
     * and returns EINTR without running guest code. */
    v->run->immediate_exit = 1;
    vmm_ioctl(v->fd, KVM_RUN, NULL);

    capture_snapshot(v, gen);
    STORE(&v->activity, VMM_ACT_PARKED);
    STORE(&v->parked_gen, gen);
    /* Only the parker that completes the count wakes the coordinator: with more vCPU
     * threads than host cores, each needless wake-up steals time from vCPUs that still
     * have to get to their park. (The coordinator re-counts per vCPU, so a stale or early
     * wake-up is harmless; a missing one is not possible: see vmm_freeze_wait.) */
    uint32_t n = __atomic_add_fetch(&vm->parked, 1, __ATOMIC_SEQ_CST);
    if (n >= LOAD(&vm->wake_target))
        futex_wake(&vm->parked, INT_MAX);

    for (;;) {
        uint32_t t = LOAD(&vm->thaw_gen);
        if ((int32_t)(t - gen) >= 0 || LOAD(&vm->stop))
            break;
        futex_wait(&vm->thaw_gen, t, NULL); /* EINTR (a kick) / EAGAIN: re-check */
    }
    v->resumed_ns = now_ns();
    STORE(&v->parked_gen, 0);
    STORE(&v->activity, VMM_ACT_RUNNING);
    return LOAD(&vm->stop) ? 1 : 0;
}

/* Makes every vCPU leave KVM_RUN: immediate_exit (so one about to enter returns at
 * once) then a signal (for one already inside). The caller has published why
 * (freeze_gen or stop) before this, with a full fence. */
static void interrupt_all(struct vmm_vm *vm)
{
    int n = LOAD(&vm->nvcpus);
    for (int i = 0; i < n; i++) {
        struct vmm_vcpu *v = vm->vcpus[i];
        if (!v)
            continue;
        spin_lock(&v->kick_lock); /* vmm_vcpu_release_run may unmap run concurrently */
        if (v->run)
            v->run->immediate_exit = 1;
        spin_unlock(&v->kick_lock);
    }
    FENCE();
    for (int i = 0; i < n; i++)
        if (vm->vcpus[i])
            kick(vm->vcpus[i]);
}

/* Coordinator: start a freeze. Returns the new generation. */
uint32_t vmm_freeze_request(struct vmm_vm *vm)
{
    uint32_t gen = __atomic_add_fetch(&vm->freeze_gen, 1, __ATOMIC_SEQ_CST);
    if (gen == 0) /* 0 means "not parked" in parked_gen: skip it on wrap */
        gen = __atomic_add_fetch(&vm->freeze_gen, 1, __ATOMIC_SEQ_CST);
    FENCE();
    interrupt_all(vm);
    return gen;
}

/* Number of vCPUs parked for generation gen. */
int vmm_parked_count(struct vmm_vm *vm, uint32_t gen)
{
    int n = LOAD(&vm->nvcpus), c = 0;
    for (int i = 0; i < n; i++)
        if (vm->vcpus[i] && LOAD(&vm->vcpus[i]->parked_gen) == gen)
            c++;
    return c;
}

/* Waits (futex, no busy loop) until `expected` vCPUs are parked for the current
 * generation, or every live vCPU thread is (fewer when some have ended).
 * Returns the parked count; less than expected means timeout. */
int vmm_freeze_wait(struct vmm_vm *vm, int expected, int64_t timeout_ns)
{
    uint32_t gen = LOAD(&vm->freeze_gen);
    uint64_t deadline = now_ns() + (uint64_t)timeout_ns;
    /* `parked` counts park events since the last thaw, so it is >= the per-vCPU count
     * when the last one parks. Threads that end always wake us (live drops). */
    int live0 = (int)LOAD(&vm->live);
    STORE(&vm->wake_target, (uint32_t)(expected < live0 ? expected : live0));
    for (;;) {
        uint32_t seen = LOAD(&vm->parked);
        int c = vmm_parked_count(vm, gen);
        int live = (int)LOAD(&vm->live);
        if (c >= expected || c >= live)
            return c;
        uint64_t now = now_ns();
        if (now >= deadline)
            return c;
        uint64_t left = deadline - now;
        struct timespec rel = {(time_t)(left / 1000000000), (long)(left % 1000000000)};
        futex_wait(&vm->parked, seen, &rel);
    }
}

void vmm_thaw(struct vmm_vm *vm)
{
    STORE(&vm->parked, 0);
    vm->thaw_ns = now_ns();
    STORE(&vm->thaw_gen, LOAD(&vm->freeze_gen));
    futex_wake(&vm->thaw_gen, INT_MAX);
}

/* Every loop returns VMM_RUN_STOPPED promptly (parked ones too). */
void vmm_request_stop(struct vmm_vm *vm)
{
    STORE(&vm->stop, 1);
    FENCE();
    futex_wake(&vm->thaw_gen, INT_MAX); /* parked ones wake, see stop, return */
    interrupt_all(vm);
}

/* ---------------------------------------------------------------- run loop */

/* Hold (on) or release a vCPU: a held loop sleeps instead of entering the guest. */
void vmm_vcpu_set_hold(struct vmm_vcpu *v, int on)
{
    STORE(&v->hold, on ? 1u : 0u);
    if (!on)
        futex_wake(&v->hold, INT_MAX);
}

/* A held vCPU sleeps here. The wait is bounded (1 ms) so that a freeze or a stop
 * requested between the checks and the futex call is seen on the next round even
 * when its kick signal came too early to interrupt the wait. */
static void wait_while_held(struct vmm_vcpu *v)
{
    const struct timespec ms = {0, 1000000};
    STORE(&v->activity, VMM_ACT_PARKED);
    while (LOAD(&v->hold) && LOAD(&v->vm->freeze_gen) == v->seen_freeze_gen &&
           !LOAD(&v->vm->stop))
        futex_wait(&v->hold, 1, &ms);
    STORE(&v->activity, VMM_ACT_RUNNING);
}

int vmm_vcpu_run(struct vmm_vcpu *v)
{
    struct vmm_vm *vm = v->vm;
    struct kvm_run *run = v->run;
    STORE(&v->activity, VMM_ACT_RUNNING);
    for (;;) {
        if (LOAD(&vm->stop)) {
            STORE(&v->activity, VMM_ACT_IDLE);
            return VMM_RUN_STOPPED;
        }
        uint32_t gen = LOAD(&vm->freeze_gen);
        if (gen != v->seen_freeze_gen) {
            handle_freeze(v, gen);
            /* Clear immediate_exit, then re-check freeze_gen (top of loop): a freeze
             * requested after our check sets it again after this store. */
            run->immediate_exit = 0;
            FENCE();
            continue;
        }
        if (LOAD(&v->hold)) {
            wait_while_held(v);
            continue;
        }
        long r = vmm_ioctl(v->fd, KVM_RUN, NULL);
        v->exits++;
        if (r < 0) {
            /* EINTR: a kick (or any signal); EAGAIN: an AP got INIT/SIPI. The loop top
             * sees a pending freeze or stop. A stale immediate_exit (a freeze that was
             * thawed before we noticed) is cleared here so we do not spin. */
            if (r == -EINTR || r == -EAGAIN) {
                if (run->immediate_exit && LOAD(&vm->freeze_gen) == v->seen_freeze_gen &&
                    !LOAD(&vm->stop)) {
                    run->immediate_exit = 0;
                    FENCE();
                }
                continue;
            }
            STORE(&v->activity, VMM_ACT_IDLE);
            return (int)r;
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (io_fast_path(v) || io_unclaimed(v)) {
                v->fast_exits++;
                continue;
            }
            break;
        case KVM_EXIT_INTR:
            continue;
        default:
            break;
        }
        STORE(&v->activity, VMM_ACT_IDLE);
        return VMM_RUN_EXIT;
    }
}
