"""Corrupt and truncated input to every parser gives a clean VmmError subclass:
never a hang, a crash, an IndexError or a struct.error. Bounded so the file takes
seconds."""

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "data"))
import kfixture  # noqa: E402

from vmm.errors import VmmError  # noqa: E402
from vmm.kernel.btf import Btf  # noqa: E402
from vmm.kernel.elf import ElfImage  # noqa: E402
from vmm.kernel.symbols import SymbolTable  # noqa: E402
from vmm.kernel.sysmap import parse_system_map  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
needs_fixture = pytest.mark.skipif(kfixture.missing_tools() is not None,
                                   reason=f"fixture build: {kfixture.missing_tools()}")

_cache: dict[str, bytes] = {}


def fixture_bytes(what: str) -> bytes:
    if what not in _cache:
        elf = kfixture.linked()
        _cache["elf"] = elf.read_bytes()
        _cache["btf"] = ElfImage(elf).btf()
    return _cache[what]


def mutate(data: bytes, edits, cut) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut % (len(buf) + 1)]) if cut is not None else bytes(buf)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12)
CUT = st.none() | st.integers(0, 1 << 20)


def exercise_btf(btf: Btf) -> None:
    """Touch every decoding path a caller can reach."""
    for tid in range(len(btf)):
        t = btf.get(tid)
        btf.type_name(t)
        try:
            btf.sizeof(t)
        except VmmError:
            pass
        if t.kind in (4, 5) and t.name:
            for name in btf.member_names(btf.resolve(t))[:4]:
                try:
                    btf.field(t, name)
                except VmmError:
                    pass
            btf.format_type(t)
    for name in ("outer", "struct rq_fx", "GREEN"):
        try:
            btf.type(name)
            btf.enum_value(name)
        except VmmError:
            pass


@needs_fixture
@FUZZ
@given(edits=EDITS, cut=CUT)
def test_btf_corrupt(edits, cut):
    data = fixture_bytes("btf")
    try:
        exercise_btf(Btf(mutate(data, [(p % 64 if i % 2 else p, v) for i, (p, v) in enumerate(edits)], cut)))
    except VmmError:
        pass


@FUZZ
@given(st.binary(max_size=256))
def test_btf_random(blob):
    try:
        exercise_btf(Btf(b"\x9f\xeb\x01\x00" + blob))
    except VmmError:
        pass


@needs_fixture
@FUZZ
@given(edits=EDITS, cut=CUT)
def test_elf_corrupt(edits, cut):
    data = fixture_bytes("elf")
    # Half the edits aim at the ELF and section headers, where damage matters most.
    shoff = int.from_bytes(data[0x28:0x30], "little")
    aimed = [((shoff + p % 1024) if i % 2 else p % 64, v) for i, (p, v) in enumerate(edits)]
    try:
        img = ElfImage(mutate(data, aimed, cut))
        img.build_id()
        SymbolTable(img.symbols())
        btf = img.btf()
        if btf:
            Btf(btf)
    except VmmError:
        pass


@FUZZ
@given(st.binary(max_size=512))
def test_elf_random(blob):
    try:
        img = ElfImage(b"\x7fELF\x02\x01\x01" + blob)
        img.symbols()
        img.build_id()
    except VmmError:
        pass


MAP_LINE = st.tuples(st.text("0123456789abcdefxyz", max_size=20),
                     st.sampled_from(["T", "t", "D", "b", "TT", ""]),
                     st.text(min_size=0, max_size=12))


@FUZZ
@given(st.lists(MAP_LINE, max_size=20), st.binary(max_size=64))
def test_system_map(lines, tail):
    text = "\n".join(" ".join(parts) for parts in lines).encode() + tail
    try:
        t = SymbolTable(parse_system_map(text))
        for s in list(t)[:5]:
            t.nearest(s.address)
    except VmmError:
        pass


def _images():
    try:
        from vmm.image import formats as images
    except ImportError:
        return None
    return images


@pytest.mark.skipif(_images() is None or not hasattr(_images(), "parse_bzimage"),
                    reason="vmm.image.formats.parse_bzimage not available")
@FUZZ
@given(st.binary(max_size=1024), st.integers(0, 0x300))
def test_bzimage_header(blob, hdr_pos):
    images = _images()
    # A setup header with the HdrS magic at 0x202 so parsing goes past the first check.
    buf = bytearray(blob.ljust(0x300, b"\0"))
    buf[0x202:0x206] = b"HdrS"
    buf[0x1FE:0x200] = b"\x55\xaa"
    buf[hdr_pos % len(buf)] ^= 0xFF
    try:
        images.extract_vmlinux(bytes(buf))
    except VmmError:
        pass
