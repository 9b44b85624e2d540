# vmm: two commands do all the set-up on a fresh machine.
#   make demo   boots a sched_ext kernel, freezes it, injects the scx clock/flag batch
#               on every CPU and prints what was written and read back
#   make test   runs the default test suite (real KVM, our own test guests)
# Slow real-kernel end-to-end tests: make test-slow (builds/fetches kernels into
# ~/.cache/vmm/kernels first).
# Hardware-virtualization tests on a PVM host: make test-svm (the same real-kernel
# suite inside the SVM lane, scripts/svm_lane.py: emulated AMD SVM under QEMU 10 TCG).
PYTHON ?= python3
KERNEL ?= build:7.3
CPUS ?= 2
PYTEST_ARGS ?=
SVM_LANE := $(PYTHON) scripts/svm_lane.py
SVM_TIMEOUT ?= 3000
SVM_TESTS ?= tests/test_svm_lane.py tests/test_e2e_linux.py tests/test_linux_boot.py tests/test_kernel_debian.py \
	tests/test_kaslr_linux.py tests/test_debug_linux.py tests/test_guestjob_linux.py tests/test_gdb_linux.py \
	tests/test_scx_linux.py tests/test_requests_linux.py tests/test_watch.py tests/test_topology_linux.py \
	tests/test_snapshot_linux.py tests/test_report_linux.py tests/test_workload_linux.py \
	tests/test_scx_tree_linux.py tests/test_scx_selftests_linux.py
# test_workload_linux (stress-ng under scx_simple in a cgroup, hackbench): 46 s of lane time.
# test_scx_tree_linux (the tree's 8 schedulers attached under load and detached, one
# boot): about 100 s. test_scx_linux's qmap -e/-t (one more boot): about 2 min.
# test_scx_selftests_linux (29 selftests, one boot): 80-90 s. It and test_scx_linux's
# test_9 (scx_qmap -l) were left out while a job's line could go missing: a kernel
# message cut it on the console, or (once the job's lines went through the kernel's log)
# its last record before a wait was never final; both fixed in kernels/init/relay.h.
SVM_DESELECT ?=

.PHONY: deps native guests demo test test-slow test-svm test-svm-topology bench bench-svm svm-setup kernel-debian kernel-build clean check-wheel fuzz test-asan

deps:
	./scripts/install-deps.sh

native:
	$(PYTHON) ffi/build_native.py

guests:
	$(MAKE) -C kernels/guests

demo: deps guests
	$(PYTHON) -m vmm.cli run --kernel $(KERNEL) --cpus $(CPUS) --inject-scx

test: deps guests
	$(PYTHON) -m pytest -q -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

test-slow: deps guests
	$(PYTHON) -m pytest -q -m slow -p no:cacheprovider $(PYTEST_ARGS) || [ $$? = 5 ]

# Every parser of untrusted input, coverage-guided with atheris (fuzz/run.py), for a
# bounded time; findings land in fuzz/findings/<target>/ and fail the run.
FUZZ_SECONDS ?= 60
fuzz:
	$(PYTHON) fuzz/run.py --seconds $(FUZZ_SECONDS)

# The C core built with AddressSanitizer + UndefinedBehaviorSanitizer into build/asan
# (the normal vmm/_native is untouched), then the default suite's KVM/runtime/memory
# files and the stop/race stress test under it (see scripts/test-asan.sh).
test-asan: guests
	./scripts/test-asan.sh $(PYTEST_ARGS)

# The real-kernel suite inside the SVM lane.  The kernels are fetched/built here on the
# host first (L1 has no network); the lane fails (status 125) if /dev/kvm in L1 is not SVM.
# SVM_RERUN: the lane's emulated SVM (QEMU TCG) sometimes writes L1's own state into a
# guest vCPU (its RIP becomes kvm_amd's __svm_vcpu_run+0x9c, its CR3 a page outside the
# guest's RAM: about 1 boot in 30 with 2 vCPUs, under vmm and QEMU as the L2 VMM alike,
# 3 of 100 each; README "The SVM lane"; scripts/boot_soak.py). A test whose guest showed
# that, or triple-faulted, runs again
# (at most 3 times, pytest-rerunfailures: one CI run needed 2 for one Debian-kernel
# fixture); any other failure fails at once. -rR lists the reruns in the summary. A
# boot that hangs that way is caught after 15 s of console silence
# (vmm.runtime.machine.STALL_CHECK_S), not at its timeout.
# The emulator also crashes L1's own kernel now and then (one CI run: a panic 750 s in):
# --l1-retries boots a fresh L1 where the run resumes (tests/conftest.py), at most 3 times.
# A test whose reruns all met the fault asks for one of those fresh L1s too before it
# counts as failed: one CI run saw the fault 5 times in a row in one L1 (a Debian-kernel
# fixture: its try and 3 reruns), against 1 boot in 43 of that kernel in a fresh L1
# (scripts/boot_soak.py --peer both --memory 1G: vmm 1 of 22, QEMU 0 of 21).
# The phrases are vmm's own (vmm.runtime), so a test that runs the CLI matches too (one
# CI run: tests/test_guestjob_linux.py's `vmm run` triple-faulted before init).
SVM_RERUN ?= -rR --reruns 3 --only-rerun \
	"the host's own \S+ \[kvm|holds the host's state|CR3 0x[0-9a-f]+ is outside the guest's RAM|vCPU [0-9]+: triple fault"
SVM_L1_RETRIES ?= 3
# A test that runs past 600 s prints its stacks and ends the run (tests/conftest.py): a
# hang of ours.  An L1 that prints nothing for 900 s froze (one CI run's did, from its
# second test until the 2400 s --timeout): it is killed and the run resumes in a fresh L1.
SVM_SILENCE ?= 900
test-svm: deps guests svm-setup
	$(SVM_LANE) run --timeout $(SVM_TIMEOUT) --l1-retries $(SVM_L1_RETRIES) --silence $(SVM_SILENCE) -- \
		$(PYTHON) -m pytest -q -m "slow or svm" \
		-p no:cacheprovider $(SVM_RERUN) $(SVM_TESTS) $(SVM_DESELECT) $(PYTEST_ARGS)

# Every topology preset booted once in the lane (a slow job, not in test-svm: its 32- and
# 64-vCPU boots take minutes each under nested TCG); prints each preset's figures.
test-svm-topology: deps guests svm-setup
	$(SVM_LANE) run --timeout $(SVM_TIMEOUT) --l1-retries $(SVM_L1_RETRIES) -- \
		$(PYTHON) -m pytest -q -s -m "slow or svm" \
		-p no:cacheprovider $(SVM_RERUN) tests/test_topology_presets_linux.py $(PYTEST_ARGS)

svm-setup:
	$(MAKE) -C kernels init
	$(MAKE) kernel-build
	$(MAKE) -C kernels kernel-build FRAGMENT=$(CURDIR)/kernels/config/sched_ext-scx.fragment
	$(MAKE) -C kernels kernel-debian-dbg
	$(PYTHON) -m vmm.cli scx build --all --kernel $(KERNEL)+scx  # the tree's schedulers (test_scx_linux,
	                                                             # test_scx_tree_linux): clang on the host, not in L1
	$(PYTHON) -m vmm.cli scx selftests --build-only --kernel $(KERNEL)+scx  # the selftests' runner
	$(SVM_LANE) setup

# Figures inside the lane: vmm vs QEMU 10 (-accel kvm, same L1) boot and freeze.
bench-svm: deps guests svm-setup
	$(SVM_LANE) run --timeout $(SVM_TIMEOUT) -- $(PYTHON) benchmarks/lane_bench.py

bench: deps guests
	$(PYTHON) benchmarks/run_all.py

# A wheel in a fresh virtualenv outside the tree: README tour, init sources and
# `vmm kernel build` from package data (scripts/check-wheel.sh).
check-wheel: guests
	PYTHON=$(PYTHON) ./scripts/check-wheel.sh

kernel-debian:
	$(MAKE) -C kernels kernel-debian

kernel-build:
	$(MAKE) -C kernels kernel-build VERSION=$(or $(VERSION),7.3)

clean:
	$(MAKE) -C kernels/guests clean
	rm -rf build *.egg-info vmm/_native*.so vmm/_native.c
