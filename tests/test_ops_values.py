"""KernelValue follows the seed: the variant picks the width; constructors validate."""

import pytest

from vmm.ops import KernelValue
from vmm.ops.values import Bytes, OrU32, U32, U64, value_from_bytes


def test_constructors_pick_variant_and_width():
    assert KernelValue.u32(7) == U32(7) and KernelValue.u32(7).width == 4
    assert KernelValue.u64(7) == U64(7) and KernelValue.u64(7).width == 8
    assert KernelValue.or_u32(1 << 5) == OrU32(32) and OrU32(32).width == 4
    assert KernelValue.bytes(b"abc") == Bytes(b"abc") and Bytes(b"abc").width == 3
    # Rust-style variant paths work too.
    assert KernelValue.U32(1) == U32(1) and KernelValue.OrU32(2) == OrU32(2)


def test_variants_are_distinct_even_with_equal_payloads():
    assert U32(5) != U64(5)
    assert U32(5) != OrU32(5)
    assert hash(U32(5)) != hash(U64(5)) or U32(5) != U64(5)


def test_encoding_is_little_endian():
    assert U32(0x11223344).encode() == bytes.fromhex("44332211")
    assert U64(0x0102030405060708).encode() == bytes.fromhex("0807060504030201")
    assert Bytes(bytearray(b"xy")).encode() == b"xy"


def test_or_u32_is_rmw_and_has_no_plain_encoding():
    assert OrU32(1).is_rmw and not U32(1).is_rmw
    with pytest.raises(TypeError):
        OrU32(1).encode()


@pytest.mark.parametrize("ctor,bad", [
    (KernelValue.u32, 1 << 32), (KernelValue.u32, -1), (KernelValue.u64, 1 << 64),
    (KernelValue.or_u32, 1 << 32), (KernelValue.u64, -5),
])
def test_out_of_range_rejected(ctor, bad):
    with pytest.raises(ValueError, match="does not fit"):
        ctor(bad)


@pytest.mark.parametrize("bad", [1.0, "1", True, None])
def test_non_int_rejected(bad):
    with pytest.raises(TypeError):
        KernelValue.u32(bad)


def test_bytes_must_be_bytes_and_nonempty():
    with pytest.raises(ValueError):
        KernelValue.bytes(b"")
    with pytest.raises(TypeError):
        KernelValue.bytes("text")


def test_no_or_u64_variant_by_design():
    assert not hasattr(KernelValue, "or_u64") and not hasattr(KernelValue, "OrU64")


def test_read_result_shape():
    assert value_from_bytes(b"\x01\0\0\0") == U32(1)
    assert value_from_bytes(b"\x02" + b"\0" * 7) == U64(2)
    assert value_from_bytes(b"abc") == Bytes(b"abc")
