/*
 * Applies a packed batch plan (see plan.h) with the width-exact primitives of
 * memory.c, so each entry has exactly the semantics of the per-entry calls the
 * Python dispatcher would make (one aligned store per U32/U64, per-byte when
 * misaligned; a copy plus a release fence per Bytes) at a fraction of their cost:
 * the cold path calls this once while every vCPU is parked, with the GIL released.
 */
#include <string.h>

#include "plan.h"
#include "vmm_native.h"

static int load(uintptr_t p, uint32_t width, uint64_t *out)
{
    switch (width) {
    case 1: *out = vmm_load_u8(p); return 1;
    case 2: *out = vmm_load_u16(p); return 1;
    case 4: *out = vmm_load_u32(p); return 1;
    case 8: *out = vmm_load_u64(p); return 1;
    }
    return 0;
}

size_t vmm_plan_apply(struct vmm_plan_entry *entries, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct vmm_plan_entry *e = &entries[i];
        switch (e->kind) {
        case VMM_PLAN_STORE:
            if (e->width == 4) {
                e->before = vmm_load_u32(e->host);
                vmm_store_u32(e->host, (uint32_t)e->value);
            } else if (e->width == 8) {
                e->before = vmm_load_u64(e->host);
                vmm_store_u64(e->host, e->value);
            } else {
                return i;
            }
            break;
        case VMM_PLAN_OR: {
            /* Atomic by quiesce: every vCPU is parked, this is the only writer. */
            uint32_t old = vmm_load_u32(e->host);
            vmm_store_u32(e->host, old | (uint32_t)e->value);
            e->before = old;
            break;
        }
        case VMM_PLAN_ATOMIC_OR:
            e->before = vmm_fetch_or_u32(e->host, (uint32_t)e->value);
            break;
        case VMM_PLAN_COPY:
            vmm_copy_from((void *)(uintptr_t)e->before, e->host, e->width);
            vmm_copy_to(e->host, (const void *)(uintptr_t)e->value, e->width);
            vmm_release_fence();
            break;
        case VMM_PLAN_LOAD:
            if (!load(e->host, e->width, &e->before))
                return i;
            break;
        case VMM_PLAN_LOAD_BYTES:
            vmm_copy_from((void *)(uintptr_t)e->before, e->host, e->width);
            break;
        default:
            return i;
        }
    }
    return n;
}
