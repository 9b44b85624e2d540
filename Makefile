# vmm: two commands do all the set-up on a fresh machine.
#   make demo   boots a sched_ext kernel, freezes it, injects the scx clock/flag batch
#               on every CPU and prints what was written and read back
#   make test   runs the default test suite (real KVM, our own test guests)
# Slow real-kernel end-to-end tests: make test-slow (builds/fetches kernels into
# ~/.cache/vmm/kernels first).
PYTHON ?= python3
KERNEL ?= build:7.3
CPUS ?= 2
PYTEST_ARGS ?=

.PHONY: deps native guests demo test test-slow bench kernel-debian kernel-build clean check-wheel fuzz test-asan

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
