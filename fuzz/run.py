"""Runs every fuzzing target for a bounded time (`make fuzz`, CI).

    python fuzz/run.py [--seconds 60] [--target btf ...] [--make-seeds]

With atheris installed each target runs coverage-guided (libFuzzer) in its own
subprocess for its share of the time, starting from the checked-in seeds
(fuzz/corpus/<target>/, copied to a scratch directory so runs do not grow the repo).
Without atheris a plain mutation loop over the seeds runs instead (no coverage
feedback; says so). A crash, a non-VmmError exception or an input slower than
--input-timeout writes the input to fuzz/findings/<target>/ and fails the run: add it
to fuzz/regressions/<target>/ with the fix, tests/test_fuzz_regressions.py replays it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
CORPUS = HERE / "corpus"
FINDINGS = HERE / "findings"


def seeds(target: str) -> list[bytes]:
    d = CORPUS / target
    return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


def make_seeds() -> None:
    from fuzz.targets import make_seeds as build

    guest = REPO / "kernels" / "guests" / "out" / "guest.elf"
    if not guest.exists():
        sys.exit("build the test guests first: make guests")
    small = Path(tempfile.mkdtemp()) / "guest-small.elf"
    # Debug info and .data dropped: a few KB, still our guest's symbols and BTF.
    subprocess.run(["objcopy", "--strip-debug", "--remove-section=.data", str(guest),
                    str(small)], check=True)
    for target, files in build(small.read_bytes()).items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
            print(f"{d / name}: {len(data)} bytes")


def atheris_child(target: str, args: list[str]) -> None:
    """Runs inside the subprocess: libFuzzer drives the target."""
    import atheris

    with atheris.instrument_imports(include=["vmm"]):
        import fuzz.targets as t
        import vmm.kernel.btf  # noqa: F401  (instrument what the targets import lazily)
        import vmm.kernel.btf_format  # noqa: F401
        import vmm.kernel.elf  # noqa: F401
        import vmm.kernel.symbols  # noqa: F401
        import vmm.kernel.sysmap  # noqa: F401
        import vmm.image.formats  # noqa: F401
        import vmm.machine.initramfs  # noqa: F401
    sys.setrecursionlimit(3000)
    atheris.Setup([sys.argv[0]] + args, lambda data: t.run_one(target, data))
    atheris.Fuzz()


def run_atheris(target: str, seconds: int, input_timeout: int) -> bool:
    work = Path(tempfile.mkdtemp(prefix=f"vmm-fuzz-{target}-"))
    for i, data in enumerate(seeds(target)):
        (work / f"seed{i}").write_bytes(data)
    out = FINDINGS / target
    out.mkdir(parents=True, exist_ok=True)
    args = [f"-max_total_time={seconds}", f"-timeout={input_timeout}", "-rss_limit_mb=3072",
            "-max_len=65536", f"-artifact_prefix={out}/", "-print_final_stats=1", str(work)]
    proc = subprocess.run([sys.executable, __file__, "--atheris-child", target, "--"] + args,
                          cwd=REPO, capture_output=True, text=True)
    shutil.rmtree(work, ignore_errors=True)
    stats = [ln for ln in proc.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    print(f"{target}: atheris {seconds} s, {stats[0].split(':')[-1].strip() if stats else '?'} "
          f"inputs, exit {proc.returncode}")
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        if not any(out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        return False
    shutil.rmtree(out, ignore_errors=True)
    return True


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data or b"\0")
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf))
        if op == 0:
            buf[pos] = rng.randrange(256)
        elif op == 1:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 2:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:  # an interesting 32-bit value, little-endian
            v = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
            buf[pos:pos + 4] = v.to_bytes(4, "little")
        if not buf:
            buf = bytearray(b"\0")
    return bytes(buf)


def run_mutation(target: str, seconds: float, input_timeout: int) -> bool:
    """No atheris: random mutations of the seeds, each input in this process with an
    alarm for --input-timeout."""
    import signal

    from fuzz.targets import run_one

    rng = random.Random(int(os.environ.get("VMM_FUZZ_SEED", "0")) or None)
    pool = seeds(target) or [b""]

    def on_alarm(*_):
        raise TimeoutError(f"input took longer than {input_timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        data = mutate(rng.choice(pool), rng)
        signal.alarm(input_timeout)
        try:
            run_one(target, data)
        except BaseException as e:  # noqa: BLE001 - every non-VmmError is a finding
            signal.alarm(0)
            out = FINDINGS / target
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"crash-{n}"
            path.write_bytes(data)
            print(f"{target}: {type(e).__name__}: {e} -> {path}")
            return False
        finally:
            signal.alarm(0)
        n += 1
    print(f"{target}: mutation loop (no atheris: no coverage feedback) {seconds:.0f} s, {n} inputs")
    return True


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--atheris-child":
        atheris_child(sys.argv[2], sys.argv[4:])
        return 0
    from fuzz.targets import TARGETS

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60, help="total, split over targets")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS))
    ap.add_argument("--input-timeout", type=int, default=10)
    ap.add_argument("--no-atheris", action="store_true")
    ap.add_argument("--make-seeds", action="store_true")
    a = ap.parse_args()
    if a.make_seeds:
        make_seeds()
        return 0
    targets = a.target or sorted(TARGETS)
    each = max(1, int(a.seconds / len(targets)))
    try:
        import atheris  # noqa: F401
        use_atheris = not a.no_atheris
    except ImportError:
        use_atheris = False
    ok = True
    for t in targets:
        ok &= (run_atheris if use_atheris else run_mutation)(t, each, a.input_timeout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
