"""Hostile or out-of-range input is refused with a VmmError naming what was wrong,
in bounded time and memory."""

from __future__ import annotations

import pytest

from vmm.errors import ImageError, TargetError, VmmError
from vmm.kernel.sysmap import parse_system_map
from vmm.ops import KernelTarget as T, KernelValue as V


# -- addresses outside [0, 2**64) ------------------------------------------------
@pytest.mark.parametrize("addr", [2**64, 2**64 + 0xFFFFFFFF81000000, -1, -(2**63), 2**80])
@pytest.mark.parametrize("ctor", [T.kva, T.gpa])
def test_targets_refuse_addresses_outside_64_bits(ctor, addr):
    with pytest.raises(TargetError, match="address"):
        ctor(addr)


@pytest.mark.parametrize("addr", [True, 1.5, "0x1000", None])
@pytest.mark.parametrize("ctor", [T.kva, T.gpa])
def test_targets_refuse_non_int_addresses(ctor, addr):
    with pytest.raises(TargetError, match="address"):
        ctor(addr)


def test_targets_accept_the_full_range():
    assert T.kva(0).address == 0 and T.kva(2**64 - 1).address == 2**64 - 1


@pytest.mark.parametrize("text", [b"-ffffffff81000000 T x\n", b"+ffffffff81000000 T x\n",
                                  b"ffff_ffff_8100_0000 T x\n", b"0x1000 T x\n",
                                  b"1ffffffffffffffff T x\n", b" \xd9\xa1 T x\n"])
def test_system_map_refuses_odd_addresses(text):
    with pytest.raises(ImageError, match="line 1"):
        parse_system_map(text)


def test_system_map_keeps_plain_hex():
    (s,) = parse_system_map(b"FFFFffff81000000 T startup_64\n")
    assert s.address == 0xFFFFFFFF81000000


# -- value constructors ----------------------------------------------------------
@pytest.mark.parametrize("make, bad, err", [
    (V.u32, 2**32, ValueError), (V.u32, -1, ValueError), (V.u64, 2**64, ValueError),
    (V.or_u32, 2**32, ValueError), (V.u32, "1", TypeError), (V.u64, 1.0, TypeError),
    (V.u32, True, TypeError), (V.bytes_, b"", ValueError), (V.bytes_, "abc", TypeError),
])
def test_value_refusals_are_vmm_errors(make, bad, err):
    with pytest.raises(VmmError) as info:
        make(bad)
    assert isinstance(info.value, err)  # still a ValueError/TypeError for old callers
    name = {"u32": "U32", "u64": "U64", "or_u32": "OrU32", "bytes_": "Bytes"}[make.__name__]
    assert name in str(info.value)
