"""How fast introspection of a real vmlinux is. Prints numbers; asserts nothing.

    python benchmarks/bench_btf.py [VMLINUX]

Default VMLINUX: the cached Debian 7.3 cloud debug vmlinux (python -m vmm.kernel.fetch_debug).
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from vmm.kernel import Kernel
from vmm.kernel.btf import Btf
from vmm.kernel.elf import ElfImage
from vmm.kernel.fetch_debug import find_cached


def timed(fn, repeat=5):
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - t)
    return result, min(runs), statistics.median(runs)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else find_cached()
    if path is None:
        sys.exit("no vmlinux given and none cached (python -m vmm.kernel.fetch_debug)")
    img = ElfImage(path)
    data = img.btf()
    print(f"vmlinux: {path}")
    print(f".BTF: {len(data) / 1e6:.1f} MB")
    btf, best, med = timed(lambda: Btf(data))
    print(f"BTF index ({len(btf) - 1} types):           best {best * 1e3:7.1f} ms  median {med * 1e3:7.1f} ms")
    _, best, _ = timed(lambda: sum(1 for _ in Btf(data).iter_types()), repeat=1)
    print(f"BTF decode of every type:              {best * 1e3:7.1f} ms")
    _, best, med = timed(lambda: Btf(data).field("struct rq", "scx.flags"))
    print(f"index + field('struct rq', 'scx.flags'): best {best * 1e3:7.1f} ms  median {med * 1e3:7.1f} ms")
    _, best, _ = timed(lambda: btf.field("struct rq", "scx.flags"), repeat=1000)
    print(f"field() on a warm Btf:                 {best * 1e6:7.1f} us")
    _, best, _ = timed(lambda: Btf(data).enum_value("SCX_RQ_CLK_VALID"), repeat=3)
    print(f"index + first enum_value():            {best * 1e3:7.1f} ms")
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["VMM_CACHE_DIR"] = cache_dir
        _, cold, _ = timed(lambda: Kernel.load(vmlinux=path), repeat=1)
        k, warm, _ = timed(lambda: Kernel.load(vmlinux=path), repeat=3)
    print(f"Kernel.load, cold cache ({len(k.symbols)} symbols): {cold * 1e3:7.1f} ms")
    print(f"Kernel.load, warm cache:               {warm * 1e3:7.1f} ms")
    _, best, _ = timed(lambda: k.symbols.nearest(k.symbol("int3_selftest") + 0x1E), repeat=1000)
    print(f"nearest():                             {best * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
