/*
 * Guest-memory primitives (see docs/CONTRACTS.md).
 *
 * The guest may read the same memory concurrently (hot path), so an aligned access
 * must be exactly one load/store instruction of its width: a volatile access of a
 * naturally aligned scalar compiles to one mov on x86-64. Misaligned accesses fall
 * back to a per-byte volatile loop, which may tear; callers that need atomicity
 * check alignment first.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "vmm_native.h"

#define ALIGNED(p, n) (((p) & ((n)-1)) == 0)

static uint64_t load_bytes(uintptr_t p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)((volatile uint8_t *)p)[i] << (8 * i);
    return v;
}

static void store_bytes(uintptr_t p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        ((volatile uint8_t *)p)[i] = (uint8_t)(v >> (8 * i));
}

uint8_t vmm_load_u8(uintptr_t p) { return *(volatile uint8_t *)p; }
void vmm_store_u8(uintptr_t p, uint8_t v) { *(volatile uint8_t *)p = v; }

uint16_t vmm_load_u16(uintptr_t p)
{
    return ALIGNED(p, 2) ? *(volatile uint16_t *)p : (uint16_t)load_bytes(p, 2);
}
void vmm_store_u16(uintptr_t p, uint16_t v)
{
    if (ALIGNED(p, 2))
        *(volatile uint16_t *)p = v;
    else
        store_bytes(p, v, 2);
}

uint32_t vmm_load_u32(uintptr_t p)
{
    return ALIGNED(p, 4) ? *(volatile uint32_t *)p : (uint32_t)load_bytes(p, 4);
}
void vmm_store_u32(uintptr_t p, uint32_t v)
{
    if (ALIGNED(p, 4))
        *(volatile uint32_t *)p = v;
    else
        store_bytes(p, v, 4);
}

uint64_t vmm_load_u64(uintptr_t p)
{
    return ALIGNED(p, 8) ? *(volatile uint64_t *)p : load_bytes(p, 8);
}
void vmm_store_u64(uintptr_t p, uint64_t v)
{
    if (ALIGNED(p, 8))
        *(volatile uint64_t *)p = v;
    else
        store_bytes(p, v, 8);
}

/* Caller guarantees 4-byte alignment (GuestMemory checks it). lock or. */
uint32_t vmm_fetch_or_u32(uintptr_t p, uint32_t mask)
{
    return __atomic_fetch_or((uint32_t *)p, mask, __ATOMIC_SEQ_CST);
}

void vmm_copy_to(uintptr_t dst, const void *src, size_t n) { memcpy((void *)dst, src, n); }
void vmm_copy_from(void *dst, uintptr_t src, size_t n) { memcpy(dst, (const void *)src, n); }

void vmm_release_fence(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* Guest RAM: anonymous, private, not counted against overcommit. 0 + *err on failure. */
#define HUGE_2M (2ul << 20)

/* Guest RAM: anonymous, MAP_NORESERVE, 2 MiB aligned and marked MADV_HUGEPAGE (best
 * effort, as QEMU does), so the guest's 2 MiB pages can be backed by host huge pages:
 * fewer host TLB misses and, on shadow-paging hosts (PVM), fewer page-table walks. */
uintptr_t vmm_map_guest_ram(size_t size, int *err)
{
    size_t span = size + HUGE_2M;
    uint8_t *p = mmap(NULL, span, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return 0;
    }
    uint8_t *base = (uint8_t *)(((uintptr_t)p + HUGE_2M - 1) & ~(HUGE_2M - 1));
    if (base > p)
        munmap(p, (size_t)(base - p));
    if (base + size < p + span)
        munmap(base + size, (size_t)(p + span - (base + size)));
    madvise(base, size, MADV_HUGEPAGE);
    *err = 0;
    return (uintptr_t)base;
}

int vmm_unmap(uintptr_t addr, size_t size)
{
    return munmap((void *)addr, size) ? -errno : 0;
}

/* Releases guest RAM without giving up its addresses: fresh zero pages replace it in
 * one mmap(MAP_FIXED), so a copy still in flight in another thread lands in harmless
 * memory instead of faulting. The range is unmapped for good (vmm_unmap) when the
 * last Python reference to the GuestMemory is gone. */
int vmm_discard_guest_ram(uintptr_t addr, size_t size)
{
    void *p = mmap((void *)addr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    return p == MAP_FAILED ? -errno : 0;
}

uint64_t vmm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
