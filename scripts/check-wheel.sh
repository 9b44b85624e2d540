#!/usr/bin/env bash
# A non-editable install works on its own: build a wheel, install it into a fresh
# virtualenv outside the tree, and from a directory outside the tree
#   1. check vmm, its config fragment and init sources come from the wheel,
#   2. build the spin initramfs from the wheel's init sources (fresh cache),
#   3. run the README's Python tour (needs /dev/kvm and `make guests`: the tour's
#      relative kernels/guests/out/guest.elf is copied beside it, as tests/test_readme.py
#      runs it from the repository root),
#   4. run `vmm kernel build` and check it resolves the fragment from package data and
#      lands on the same cache key as the repository's fragment (reuses the cached
#      kernel, or builds it: minutes).
# Usage: scripts/check-wheel.sh   (make check-wheel)   VMM_CHECK_WHEEL_SKIP_BUILD=1 skips 4.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/vmm-check-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
say() { echo "check-wheel: $*"; }

say "building the wheel"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
wheel=$(ls "$WORK"/dist/vmm-*.whl)
say "fresh virtualenv $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
# with the plot extra, as a user who wants the README's plot example (matplotlib): this
# also checks that the extra is declared in the wheel
"$WORK/venv/bin/pip" install -q "$wheel[plot]"
PY="$WORK/venv/bin/python"
VMM="$WORK/venv/bin/vmm"

mkdir -p "$WORK/run" && cd "$WORK/run"   # nothing of the repository on sys.path
say "1. files come from the wheel"
"$PY" - "$ROOT" <<'PYEOF'
import sys
from pathlib import Path
import vmm, vmm.kernelstore as ks, vmm.machine.initramfs as ir
root = Path(sys.argv[1]).resolve()
site = Path(vmm.__file__).resolve().parent
for what, p in (("vmm", Path(vmm.__file__)), ("fragment", ks.DEFAULT_FRAGMENT),
                ("init sources", ir.INIT_SOURCES)):
    p = Path(p).resolve()
    assert root not in p.parents, f"{what} comes from the repository: {p}"
    assert site in p.parents or p.parent == site, f"{what} not in the installed package: {p}"
    assert p.exists(), f"{what} missing: {p}"
    print(f"  {what}: {p}")
repo_hash = ks.fragment_hash(root / "kernels/config/sched_ext.fragment")
assert ks.fragment_hash(ks.DEFAULT_FRAGMENT) == repo_hash, "packaged fragment differs from the repo's"
print(f"  fragment hash {repo_hash} (same as the repository's)")
PYEOF

say "2. spin initramfs from the wheel's init sources"
VMM_CACHE_DIR="$WORK/cache" "$PY" -c "
from vmm.machine.initramfs import build_initramfs
p = build_initramfs(init='spin'); print('  ', p, p.stat().st_size, 'bytes')"

say "3. README tour"
if [ -r /dev/kvm ] && [ -f "$ROOT/kernels/guests/out/guest.elf" ]; then
    mkdir -p kernels/guests/out && cp "$ROOT/kernels/guests/out/guest.elf" kernels/guests/out/
    "$PY" - "$ROOT/README.md" <<'PYEOF'
import re, sys
blocks = re.findall(r"```python\n(.*?)```", open(sys.argv[1]).read(), re.S)
assert blocks, "README has no Python blocks"
for i, code in enumerate(blocks):
    exec(compile(code, f"README.md block {i}", "exec"), {})
print(f"  {len(blocks)} README block(s) ran")
PYEOF
    "$VMM" run --kernel kernels/guests/out/guest.elf --cmdline 'mode=hello exit=3' --quiet \
        && rc=0 || rc=$?
    [ "$rc" = 3 ] || { say "vmm run gave $rc, expected the guest's 3"; exit 1; }
    say "  vmm run: guest exit code 3 passed through"
else
    say "  skipped: needs /dev/kvm and the test guest (make guests)"
fi

say "4. vmm kernel build from the wheel"
if [ "${VMM_CHECK_WHEEL_SKIP_BUILD:-0}" = 1 ]; then
    say "  skipped (VMM_CHECK_WHEEL_SKIP_BUILD=1)"
else
    "$VMM" kernel build 7.3 --json > build.json
    "$PY" - "$ROOT" <<'PYEOF'
import json, sys
from pathlib import Path
import vmm.kernelstore as ks
art = json.load(open("build.json"))
want = f"build-7.3-{ks.fragment_hash(Path(sys.argv[1]) / 'kernels/config/sched_ext.fragment')}"
assert art["name"] == want, f"wheel's build is {art['name']}, the repository's key is {want}"
print(f"  {art['name']}: the repository's cache key; bzImage {art['bzimage']}")
PYEOF
fi
say "ok"
