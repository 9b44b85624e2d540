"""The kernel command line a Linux guest needs on a PVM host.

Options keep Linux away from what the host's emulator cannot run (``noxsave``,
``clearcpuid=`` for CPUID features the guest sees because CPUID is the L1 host's,
whatever KVM_SET_CPUID2 says) and from timing checks an emulated kernel fails
(``lpj=``, ``tsc=reliable``...). The reason for each is beside it.
"""

from __future__ import annotations

# Options appended, in this order, unless the command line already sets the same key.
PVM_CMDLINE_OPTIONS = (
    "noxsave",  # xsave/xrstor cannot be emulated
    "nopti",  # page-table isolation doubles the (emulated) entry/exit work
    "mitigations=off",  # speculation mitigations: emulated retpolines/verw only cost
    "lpj=5000000",  # skip delay-loop calibration (meaningless, and slow, under emulation)
    "tsc=reliable",  # the emulated TSC watchdog would mark the TSC unstable
    "no_timer_check",  # the IO-APIC timer check fails when ticks arrive "late"
    "rcupdate.rcu_cpu_stall_suppress=1",  # emulated CPUs look stalled to RCU
    "nokaslr",  # the vmlinux boots where it was linked (host-side decompression) anyway
)
# CPUID features to hide, most important first: the kernel keeps only the first 127
# characters of clearcpuid= (a 128-byte buffer) and silently drops the rest.
# cx16: cmpxchg16b; smap: clac/stac; popcnt; ssse3: blake2s_compress_ssse3 (SSE movd);
# then VEX (AVX, BMI) users and instructions the emulator lacks.
CLEARCPUID_FEATURES = (
    "cx16", "smap", "popcnt", "ssse3", "sse4_2", "avx", "avx2", "avx512f", "bmi1", "bmi2",
    "fsgsbase", "rdrand", "rdseed", "pku", "invpcid", "clflushopt", "rdpid", "movbe",
)  # fmt: skip
CLEARCPUID_MAX = 127


def clearcpuid_value(features=CLEARCPUID_FEATURES, limit: int = CLEARCPUID_MAX) -> str:
    """Comma-joined features, as many whole ones as fit in ``limit`` characters."""
    out = ""
    for feature in features:
        candidate = f"{out},{feature}" if out else feature
        if len(candidate) > limit:
            break
        out = candidate
    return out


def _option_key(token: str) -> str:
    return token.split("=", 1)[0]


def pvm_cmdline(base: str) -> str:
    """``base`` plus the options a Linux guest needs on a PVM host.

    Options whose key ``base`` already sets are left as the caller wrote them
    (``mitigations=auto`` in ``base`` wins over ours).  Words after ``--`` belong to
    init, so ours go before it.
    """
    tokens = base.split()
    cut = tokens.index("--") if "--" in tokens else len(tokens)
    head, init_args = tokens[:cut], tokens[cut:]
    keys = {_option_key(t) for t in head}
    extra = [opt for opt in PVM_CMDLINE_OPTIONS if _option_key(opt) not in keys]
    if "clearcpuid" not in keys:
        extra.append("clearcpuid=" + clearcpuid_value())
    return " ".join(head + extra + init_args)
