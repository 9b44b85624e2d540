/*
 * A packed batch plan applied in one call (vmm/ops/plan.py builds it): every entry is
 * resolved and validated before the call, so this only touches memory, in order.
 */
#ifndef VMM_PLAN_H
#define VMM_PLAN_H
#include <stddef.h>
#include <stdint.h>

enum {
    VMM_PLAN_STORE = 0,     /* before = load(width); store(width, value)             */
    VMM_PLAN_OR = 1,        /* cold OrU32: before = load u32; store u32 before|value  */
    VMM_PLAN_ATOMIC_OR = 2, /* hot OrU32: before = atomic fetch-or (4-byte aligned)   */
    VMM_PLAN_COPY = 3,      /* Bytes: old bytes -> (void *)before; copy from (void *)value;
                               release fence                                          */
    VMM_PLAN_LOAD = 4,      /* before = load(width), width 1, 2, 4 or 8               */
    VMM_PLAN_LOAD_BYTES = 5 /* width bytes -> (void *)before                          */
};

struct vmm_plan_entry {
    uintptr_t host;  /* host address of the guest-physical target */
    uint64_t value;  /* STORE: the value; OR/ATOMIC_OR: the mask; COPY: source address */
    uint64_t before; /* out: the value found; COPY/LOAD_BYTES: in, a buffer's address */
    uint32_t width;  /* bytes */
    uint32_t kind;   /* VMM_PLAN_* */
};

/* Applies entries [0, n) in order; returns how many it applied (n unless an entry has
 * an unknown kind or width: it stops there, before touching that entry). */
size_t vmm_plan_apply(struct vmm_plan_entry *entries, size_t n);

#endif
