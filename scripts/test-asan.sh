#!/usr/bin/env bash
# The C core under AddressSanitizer + UndefinedBehaviorSanitizer (CI job; make test-asan).
#
# Builds ffi/*.c with -fsanitize=address,undefined into build/asan/ (the normal
# vmm/_native stays as it is), points vmm at it (VMM_NATIVE), preloads libasan (the
# Python interpreter is not instrumented, so the runtime must come first), then runs
# the default suite and the stop/race stress test (tests/test_teardown.py with
# VMM_TEARDOWN_ROUNDS rounds). Any sanitizer report aborts the process: the test fails.
# Extra arguments go to pytest (e.g. a subset: tests/test_freeze.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
so=$(VMM_SANITIZE=1 "$PY" ffi/build_native.py | tail -1)
libasan=$(gcc -print-file-name=libasan.so)
[ -e "$libasan" ] || { echo "libasan not found (apt-get install libasan8 / gcc)"; exit 1; }
export VMM_NATIVE="$so"
# libstdc++ beside it: ASan intercepts __cxa_throw and needs the real one loaded when it
# starts, or the first C++ exception of an extension (matplotlib's ft2font, pybind11)
# aborts with "CHECK failed ... real___cxa_throw".
libstdcxx=$(gcc -print-file-name=libstdc++.so)
export LD_PRELOAD="$libasan${libstdcxx:+:$(readlink -f "$libstdcxx")}"
# Python itself leaks by design and is not instrumented: leak checking off; every other
# report is fatal. UBSan reports are fatal too (-fno-sanitize-recover at build time).
# Reports go to build/asan/report.* (pytest captures stderr, and an aborting process
# would take the report with it) and are printed at the end.
reports="$PWD/build/asan/report"
rm -f "$reports".*
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:halt_on_error=1:allow_user_segv_handler=1:log_path=$reports}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:log_path=$reports}
export VMM_TEARDOWN_ROUNDS=${VMM_TEARDOWN_ROUNDS:-25}
echo "C core under ASan+UBSan: $so"
if [ $# -eq 0 ]; then
    set -- tests/
fi
rc=0
"$PY" -m pytest -q -rf -m "not slow" -p no:cacheprovider "$@" || rc=$?
# Only errors fail the job; ASan's warnings (a subprocess using makecontext) do not.
errors=$(grep -l -E "ERROR: |runtime error:" "$reports".* 2>/dev/null || true)
if [ -n "$errors" ]; then
    echo "=== sanitizer reports ==="
    cat $errors
    [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
