"""vmm.kernel.btf against pahole on a small ELF built with gcc -g + pahole -J."""

import re
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
import kfixture  # noqa: E402

from vmm.errors import FieldPathError, ImageError, TypeNotFound  # noqa: E402
from vmm.kernel.btf import ENUM64, Btf, parse_path  # noqa: E402
from vmm.kernel.elf import ElfImage  # noqa: E402

from pahole_text import pahole_members, pahole_size  # noqa: E402

pytestmark = pytest.mark.skipif(kfixture.missing_tools() is not None,
                                reason=f"fixture build: {kfixture.missing_tools()}")

@pytest.fixture(scope="module")
def elf_path():
    return kfixture.linked()


@pytest.fixture(scope="module")
def btf(elf_path):
    return Btf(ElfImage(elf_path).btf())


@pytest.mark.parametrize("struct_name", ["outer", "inner", "bits", "rq_fx", "scx_rq_fx"])
def test_layout_matches_pahole(btf, elf_path, struct_name):
    text = kfixture.pahole(elf_path, struct_name)
    expected = pahole_members(text)
    assert expected, text
    for name, (off, size, bit) in expected.items():
        f = btf.field(f"struct {struct_name}", name)
        assert (f.offset, f.size) == (off, size), (struct_name, name)
        if bit is not None:
            assert f.bit_offset == bit, (struct_name, name)
    assert btf.sizeof(f"struct {struct_name}") == pahole_size(text)


def test_anonymous_union_and_struct_members(btf):
    assert btf.offsetof("struct outer", "u_int") == 8
    assert btf.offsetof("struct outer", "hi") == 10
    assert btf.field("outer", "lo").size == 2


def test_bitfields(btf):
    x, y, z, s = (btf.field("struct bits", n) for n in "xyzs")
    assert (x.offset, x.size, x.bit_offset, x.bit_size) == (0, 4, 0, 3)
    assert (y.bit_offset, y.bit_size) == (3, 5)
    assert (z.offset, z.size, z.bit_offset, z.bit_size) == (0, 8, 8, 40)
    assert (s.offset, s.bit_offset, s.bit_size) == (4, 16, 4)
    assert btf.resolve(s.type).signed
    assert btf.field("struct outer", "bf.c").offset == 48 + 7


def test_arrays_and_nested_paths(btf):
    assert btf.offsetof("struct outer", "arr[2].b") == 12 + 2 * 8 + 4
    # pahole -J flattens int matrix[2][3] into int[6] in BTF
    assert btf.offsetof("struct outer", "matrix[5]") == 72 + 5 * 4
    assert btf.field("struct outer", "matrix").size == 24
    assert btf.offsetof("struct rq_fx", "scx.flags") == 8 + 8  # scx aligned to 8, after pad
    with pytest.raises(FieldPathError, match=r"out of bounds"):
        btf.field("struct outer", "arr[4]")
    with pytest.raises(FieldPathError, match="not an array"):
        btf.field("struct outer", "first[0]")


def test_pointer_is_not_followed(btf):
    with pytest.raises(FieldPathError, match="pointer"):
        btf.field("struct outer", "ptr.a")
    with pytest.raises(FieldPathError, match="pointer"):
        btf.field("struct outer", "ptr->a")
    assert btf.field("struct outer", "ptr").size == 8


def test_unknown_field_names_component_and_suggests(btf):
    with pytest.raises(FieldPathError) as e:
        btf.field("struct rq_fx", "scx.flag")
    assert "'flag'" in str(e.value) and "flags" in str(e.value)


def test_type_lookup_with_and_without_prefix(btf):
    assert btf.type("struct outer") is btf.type("outer")
    assert btf.type("outer_t").kind_name == "typedef"
    assert btf.resolve(btf.type("couter_t")) is btf.type("outer")
    assert btf.sizeof("couter_t") == 112
    assert btf.field("couter_t", "tail").size == 5
    assert btf.type("enum color").kind_name == "enum"
    with pytest.raises(TypeNotFound) as e:
        btf.type("struct outr")
    assert "outer" in str(e.value)


def test_enums(btf):
    assert btf.enum_value("GREEN") == 5
    assert btf.enum_value("BLUE") == -2
    assert btf.enum_value("WIDE_BIG") == 1 << 32
    assert btf.type("enum wide").kind == ENUM64
    with pytest.raises(TypeNotFound, match="GREEN"):
        btf.enum_value("GREN")


def test_format_type_is_pahole_like(btf):
    text = btf.format_type("struct outer")
    assert "struct outer {" in text and "size: 112" in text
    assert re.search(r"tail\[5\];\s+/\*\s+104\s+5 \*/", text)
    assert "(*fn)(int, char *)" in text
    assert "XXX 4 bytes hole" in text
    assert "x:3;" in btf.format_type("bits")
    assert "BLUE = -2" in btf.format_type("enum color")


def test_type_names(btf):
    assert btf.type_name(btf.field("outer", "ptr").type) == "struct inner *"
    assert btf.type_name(btf.field("outer", "cv").type) == "volatile const int"  # as pahole spells it


def test_every_type_decodes(btf):
    kinds = {t.kind_name for t in btf.iter_types()}
    assert {"int", "ptr", "array", "struct", "union", "enum", "typedef", "const",
            "volatile", "func", "func_proto", "var", "datasec"} <= kinds


def test_parse_path():
    assert parse_path("scx.flags") == ["scx", "flags"]
    assert parse_path("cpus[3].x") == ["cpus", 3, "x"]
    assert parse_path("a[0x10]") == ["a", 16]
    for bad in ("", "a..b", "a b", "[", "3"):
        with pytest.raises(FieldPathError):
            parse_path(bad)


def _blob(btf_bytes: bytes, **fields) -> bytes:
    names = ("magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len")
    vals = dict(zip(names, struct.unpack_from("<HBBIIIII", btf_bytes)))
    vals.update(fields)
    return struct.pack("<HBBIIIII", *(vals[n] for n in names)) + btf_bytes[24:]


def test_header_validation(btf):
    data = btf.data
    with pytest.raises(ImageError, match="magic"):
        Btf(_blob(data, magic=0x1234))
    with pytest.raises(ImageError, match="big-endian"):
        Btf(_blob(data, magic=0x9FEB))
    with pytest.raises(ImageError, match="version"):
        Btf(_blob(data, version=2))
    with pytest.raises(ImageError, match="string section"):
        Btf(_blob(data, str_len=10**6))
    with pytest.raises(ImageError, match="type section"):
        Btf(_blob(data, type_len=10**6))
    with pytest.raises(ImageError, match="too short"):
        Btf(data[:10])


def test_bad_type_reference_is_image_error(btf):
    # Point the first PTR/TYPEDEF's referenced id far past the last type.
    b = Btf(btf.data)
    tid = next(i for i in range(1, len(b)) if b.kind_of(i) in (2, 8))
    pos = b._offsets[tid] + 8
    corrupt = bytearray(b.data)
    corrupt[pos:pos + 4] = struct.pack("<I", 99999)
    with pytest.raises(ImageError, match="99999"):
        Btf(bytes(corrupt)).get(tid)


def test_modifier_cycle_is_image_error(btf):
    b = Btf(btf.data)
    tid = next(i for i in range(1, len(b)) if b.kind_of(i) == 8)  # a typedef
    corrupt = bytearray(b.data)
    corrupt[b._offsets[tid] + 8:b._offsets[tid] + 12] = struct.pack("<I", tid)
    with pytest.raises(ImageError, match="cycle"):
        Btf(bytes(corrupt)).resolve(tid)
