"""The C primitives of vmm._native: widths, alignment, atomic OR, ioctl errno."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from vmm.kvm.native import native

ffi, lib = native()

WIDTHS = {
    2: (lib.vmm_load_u16, lib.vmm_store_u16),
    4: (lib.vmm_load_u32, lib.vmm_store_u32),
    8: (lib.vmm_load_u64, lib.vmm_store_u64),
}


@pytest.fixture
def page():
    err = ffi.new("int *")
    addr = lib.vmm_map_guest_ram(4096, err)
    assert addr and err[0] == 0
    yield addr
    assert lib.vmm_unmap(addr, 4096) == 0


def raw(addr, n):
    return bytes(ffi.buffer(ffi.cast("uint8_t *", addr), n))


def test_u8(page):
    lib.vmm_store_u8(page + 3, 0xAB)
    assert lib.vmm_load_u8(page + 3) == 0xAB
    assert raw(page, 5) == b"\0\0\0\xab\0"


@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("offset", range(8))
def test_store_load_is_little_endian_and_exact_width(page, width, offset):
    load, store = WIDTHS[width]
    value = int.from_bytes(bytes(range(0x11, 0x11 + width)), "little")
    base = page + 64 + offset
    lib.vmm_copy_to(page, b"\xee" * 256, 256)
    store(base, value)
    assert load(base) == value
    # exactly `width` bytes changed, little-endian, aligned or not
    assert raw(base - 1, width + 2) == b"\xee" + value.to_bytes(width, "little") + b"\xee"


def test_aligned_u64_store_does_not_tear_under_concurrent_reader(page):
    # An aligned store is one instruction: a concurrent reader sees old or new, never a mix.
    addr = page + 128
    values = (0, 0xFFFFFFFFFFFFFFFF, 0x0123456789ABCDEF)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            lib.vmm_store_u64(addr, values[i % 3])
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen = {lib.vmm_load_u64(addr) for _ in range(50_000)}
    finally:
        stop.set()
        t.join()
    assert seen <= set(values)


def test_fetch_or_returns_old_value(page):
    lib.vmm_store_u32(page, 0x10)
    assert lib.vmm_fetch_or_u32(page, 0x21) == 0x10
    assert lib.vmm_load_u32(page) == 0x31


def test_fetch_or_is_atomic_under_two_threads(page):
    # Both threads OR their own bit into the same words; a non-atomic read-or-write
    # would sometimes lose the other thread's bit.
    n = 1000
    rounds = 20
    barrier = threading.Barrier(2)

    def worker(bit):
        barrier.wait()
        for _ in range(rounds):
            for i in range(n):
                lib.vmm_fetch_or_u32(page + 4 * i, 1 << bit)

    for bit_pair in range(4):
        lib.vmm_copy_to(page, b"\0" * 4096, 4096)
        ts = [threading.Thread(target=worker, args=(b,)) for b in (2 * bit_pair, 2 * bit_pair + 1)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        want = 3 << (2 * bit_pair)
        assert all(lib.vmm_load_u32(page + 4 * i) == want for i in range(n))


def test_copy_and_fence(page):
    lib.vmm_copy_to(page + 10, b"hello", 5)
    out = ffi.new("uint8_t[]", 5)
    lib.vmm_copy_from(out, page + 10, 5)
    assert bytes(out) == b"hello"
    lib.vmm_release_fence()


def test_map_failure_reports_errno():
    err = ffi.new("int *")
    assert lib.vmm_map_guest_ram(1 << 60, err) == 0
    assert err[0] == errno.ENOMEM


def test_ioctl_returns_negative_errno():
    assert lib.vmm_ioctl_int(-1, lib.KVM_GET_API_VERSION, 0) == -errno.EBADF
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        assert lib.vmm_ioctl(fd, lib.KVM_GET_REGS, ffi.NULL) == -errno.ENOTTY
    finally:
        os.close(fd)


def test_monotonic_clock():
    a = lib.vmm_now_ns()
    b = lib.vmm_now_ns()
    assert 0 < a <= b


def test_serial_ring_without_a_vm():
    vm = lib.vmm_vm_new(-1)
    try:
        lib.vmm_serial_push(vm, b"abc", 3)
        assert lib.vmm_serial_pending(vm) == 3
        assert lib.vmm_serial_wait(vm, 0) == 3  # data: returns at once
        buf = ffi.new("uint8_t[]", 16)
        assert lib.vmm_serial_drain(vm, buf, 16) == 3 and bytes(buf[0:3]) == b"abc"
        assert lib.vmm_serial_wait(vm, 1_000_000) == 0  # empty: times out
        # a full ring drops (and counts) instead of overwriting
        big = b"x" * (lib.VMM_SERIAL_RING_SIZE + 10)
        lib.vmm_serial_push(vm, big, len(big))
        assert lib.vmm_serial_pending(vm) == lib.VMM_SERIAL_RING_SIZE
        assert vm.serial_dropped == 10
    finally:
        lib.vmm_vm_free(vm)
