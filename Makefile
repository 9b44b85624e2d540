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

.PHONY: deps native guests demo test test-slow bench kernel-debian kernel-build clean check-wheel

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
