"""GuestMemory: layout around the MMIO gap, bounds checks, width-exact typed access."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vmm.errors import GuestMemoryError, GuestOutOfMemory
from vmm.kvm import GuestMemory
from vmm.kvm.memory import MMIO_GAP_END, MMIO_GAP_START

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory(2 * MiB)
    yield m
    m.close()


def test_small_memory_is_one_region(mem):
    assert mem.size == 2 * MiB
    (gpa, size, host), = mem.regions
    assert gpa == 0 and size == 2 * MiB and host == mem.host_address(0)


def test_memory_above_3g_moves_past_the_gap():
    with GuestMemory(5 * GiB) as m:  # MAP_NORESERVE: costs no RAM until touched
        assert [(g, s) for g, s, _ in m.regions] == [(0, MMIO_GAP_START),
                                                     (MMIO_GAP_END, 5 * GiB - MMIO_GAP_START)]
        m.write_u32(MMIO_GAP_END, 0xCAFE)
        assert m.read_u32(MMIO_GAP_END) == 0xCAFE
        assert m.contains(MMIO_GAP_START - 4, 4) and not m.contains(MMIO_GAP_START - 2, 4)
        with pytest.raises(GuestMemoryError, match="not inside guest RAM"):
            m.host_address(MMIO_GAP_START, 1)  # in the gap
        with pytest.raises(GuestMemoryError):
            m.read(MMIO_GAP_START - 4, 8)  # spans the gap
        with pytest.raises(GuestMemoryError):
            m.host_address(MMIO_GAP_END + 2 * GiB, 1)  # past the top


def test_error_names_gpa_length_and_ranges(mem):
    with pytest.raises(GuestMemoryError) as e:
        mem.write(2 * MiB - 2, b"abcd")
    msg = str(e.value)
    assert "0x1ffffe" in msg and "0x4" in msg and "[0x0, 0x200000)" in msg


def test_out_of_bounds_write_changes_nothing(mem):
    mem.write(2 * MiB - 4, b"\x11\x22\x33\x44")
    for bad in (lambda: mem.write(2 * MiB - 2, b"zzzz"),
                lambda: mem.write_u64(2 * MiB - 4, 0),
                lambda: mem.write_u32(2 * MiB - 3, 0)):
        with pytest.raises(GuestMemoryError):
            bad()
    assert mem.read(2 * MiB - 4, 4) == b"\x11\x22\x33\x44"


@pytest.mark.parametrize("bad", [-1, 1 << 64, "0x10", 1.5, None])
def test_bad_addresses_are_guest_memory_errors(mem, bad):
    with pytest.raises(GuestMemoryError):
        mem.read_u8(bad)


def test_typed_access_round_trips(mem):
    for gpa in (0x100, 0x101, 0x103, 0x107):  # aligned and not
        mem.write_u16(gpa, 0xBEEF)
        assert mem.read_u16(gpa) == 0xBEEF
        mem.write_u32(gpa, 0xDEADBEEF)
        assert mem.read_u32(gpa) == 0xDEADBEEF
        mem.write_u64(gpa, 0x0123456789ABCDEF)
        assert mem.read_u64(gpa) == 0x0123456789ABCDEF
        assert mem.read(gpa, 8) == (0x0123456789ABCDEF).to_bytes(8, "little")
    mem.write_u8(0x200, 0x7F)
    assert mem.read_u8(0x200) == 0x7F


@pytest.mark.parametrize("write,value", [("write_u8", 256), ("write_u16", -1),
                                         ("write_u32", 1 << 32), ("write_u64", 1 << 64)])
def test_values_must_fit_the_width(mem, write, value):
    mem.write_u64(0x300, 0)
    with pytest.raises(GuestMemoryError, match="does not fit"):
        getattr(mem, write)(0x300, value)
    assert mem.read_u64(0x300) == 0


def test_fetch_or(mem):
    mem.write_u32(0x400, 0x1)
    assert mem.fetch_or_u32(0x400, 0x20) == 0x1
    assert mem.read_u32(0x400) == 0x21
    with pytest.raises(GuestMemoryError, match="alignment"):
        mem.fetch_or_u32(0x402, 1)
    mem.release_fence()


def test_bad_sizes():
    with pytest.raises(GuestMemoryError, match="multiple of 4 KiB"):
        GuestMemory(4097)
    with pytest.raises(GuestMemoryError):
        GuestMemory(0)
    with pytest.raises(GuestOutOfMemory, match="ask for less"):
        GuestMemory(1 << 60)


def test_closed_memory_refuses_access():
    m = GuestMemory(64 * 1024)
    m.close()
    with pytest.raises(GuestMemoryError, match="closed"):
        m.read_u8(0)


@settings(max_examples=300, deadline=None)
@given(gpa=st.integers(-8, 5 * MiB), length=st.integers(0, 3 * MiB))
def test_contains_agrees_with_host_address(mem, gpa, length):
    if mem.contains(gpa, length):
        assert mem.host_address(gpa, length) == mem.regions[0][2] + gpa
    else:
        with pytest.raises(GuestMemoryError):
            mem.host_address(gpa, length)
