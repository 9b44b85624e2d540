#!/usr/bin/env bash
# Installs everything vmm needs on a fresh Debian machine, idempotently:
# system packages (compiler, pahole for BTF, kernel build tools, QEMU for the
# side-by-side benchmarks, crash to open our vmcores) and the Python package itself
# with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(gcc make libc6-dev dwarves cpio zstd xz-utils lz4 bzip2 flex bison bc
      libelf-dev libssl-dev busybox-static qemu-system-x86 ca-certificates crash
      clang-22 llvm-22 zlib1g-dev  # `vmm scx build` (BPF): clang and llvm-strip; 7.3's
      # arena schedulers (scx_qmap) need clang 20+: clang 19 dropped an addr_space_cast
      # and the verifier refused qmap_dequeue (bookworm-security has 22)
      gdb  # the gdb stub's tests drive Debian's gdb
      libzstd-dev  # the kernel's sched_ext selftests runner links -lzstd (vmm scx selftests)
      stress-ng rt-tests  # real workloads in the guest job (hackbench is rt-tests')
      chromium)  # tests/test_report_html.py opens vmm report's page headless
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps: apt-get install ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
# Editable install builds the cffi extension (vmm._native) in place.
$PY -m pip install -q --disable-pip-version-check -e '.[test,plot]'
$PY -c 'import vmm._native' || { echo "install-deps: the cffi extension did not build" >&2; exit 1; }
