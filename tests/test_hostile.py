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


# -- cpio (newc) -------------------------------------------------------------------
def _newc_header(namesize: bytes, filesize: bytes = b"00000000") -> bytes:
    fields = [b"00000001", b"000081a4", b"00000000", b"00000000", b"00000001",
              b"00000000", filesize, b"00000000", b"00000000", b"00000000", b"00000000",
              namesize, b"00000000"]
    return b"070701" + b"".join(fields)


def _run_bounded(code: str, timeout: float = 20, limit: int = 1 << 30) -> None:
    """Runs code in a subprocess with a 1 GiB address-space limit: a parser that loops
    or balloons fails the test instead of taking the machine down."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    prog = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}));"
            f"sys.path.insert(0, {str(repo)!r});" + code)
    # Pure-Python parsers: without the sanitizer runtime (make test-asan), which needs
    # far more address space than the limit allows.
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "VMM_NATIVE", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("namesize", [b"-000006E", b"+0000006", b"0000_006", b"00000000",
                                      b"7fffffff"])
def test_cpio_bad_name_size_is_refused_quickly(namesize):
    archive = (_newc_header(namesize) + b"a\0\0\0") * 4
    _run_bounded(f"""
from vmm.errors import ImageError
from vmm.machine.initramfs import parse_newc
try:
    parse_newc({archive!r})
except ImageError as e:
    assert 'offset 0' in str(e), e
else:
    raise SystemExit('accepted')
""")


def test_cpio_corrupt_gzip_is_image_error():
    import gzip

    from vmm.machine.initramfs import create_initramfs, file, parse_newc

    blob = bytearray(create_initramfs([file("init", b"x" * 5000)]))
    blob[30:40] = b"\xff" * 10
    with pytest.raises(ImageError, match="gzip"):
        parse_newc(bytes(blob))
    with pytest.raises(ImageError, match="gzip"):
        parse_newc(gzip.compress(b"x")[:-6])


def test_cpio_gzip_bomb_is_bounded():
    import gzip

    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB from ~64 KB
    from vmm.machine.initramfs import parse_newc

    with pytest.raises(ImageError, match="more than"):
        parse_newc(bomb, max_size=16 << 20)


# -- bzImage payloads: decompression bounded by the image's own header ---------------
def _bomb(kind: str, size: int) -> bytes:
    import struct
    import zlib

    import zstandard

    zeros = bytes(16 << 20)
    if kind == "zstd":
        c = zstandard.ZstdCompressor(level=1).compressobj()
    else:
        c = zlib.compressobj(1, zlib.DEFLATED, 31)
    body = b"".join(c.compress(zeros) for _ in range(size // len(zeros))) + c.flush()
    return body + struct.pack("<I", size & 0xFFFFFFFF)


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_bzimage_decompression_bomb_is_bounded(kind, tmp_path):
    from fuzz.synthetic_images import make_bzimage  # init_size 8 MiB

    image = tmp_path / "bzImage"
    image.write_bytes(make_bzimage(_bomb(kind, 768 << 20)))
    # 768 MiB of output in a process limited to 768 MiB of address space: only a
    # decompressor that stops at the header's bound (init_size) gets through.
    _run_bounded(f"""
from vmm.errors import ImageError
from vmm.image.formats import extract_vmlinux
try:
    extract_vmlinux(open({str(image)!r}, 'rb').read())
except ImageError as e:
    assert 'more than' in str(e), e
else:
    raise SystemExit('accepted')
""", limit=768 << 20, timeout=60)


# -- BTF type graphs with cycles and blow-ups -----------------------------------------
class BtfBuilder:
    """A little-endian BTF blob from hand-written types (ids from 1)."""

    def __init__(self):
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def name(self, s: str) -> int:
        if not s:
            return 0
        off = len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def add(self, kind: int, name: str = "", vlen: int = 0, size_type: int = 0,
            extra: bytes = b"") -> int:
        import struct

        self.types.append(struct.pack("<III", self.name(name), (kind << 24) | vlen, size_type)
                          + extra)
        return len(self.types)

    def int_(self, name="int", size=4):
        import struct

        return self.add(1, name, 0, size, struct.pack("<I", size * 8))

    def struct_(self, name, size, members):  # members: [(name, type_id, bit_offset)]
        import struct

        extra = b"".join(struct.pack("<III", self.name(n), t, o) for n, t, o in members)
        return self.add(4, name, len(members), size, extra)

    def array(self, elem, nelems, index=1):
        import struct

        return self.add(3, "", 0, 0, struct.pack("<III", elem, index, nelems))

    def ptr(self, target):
        return self.add(2, "", 0, target)

    def proto(self, ret, params):
        import struct

        return self.add(13, "", len(params), ret,
                        b"".join(struct.pack("<II", 0, p) for p in params))

    def blob(self) -> bytes:
        import struct

        types = b"".join(self.types)
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                          len(self.strings))
        return hdr + types + bytes(self.strings)


EXERCISE_BTF = """
from vmm.errors import VmmError
from vmm.kernel.btf import Btf
btf = Btf({blob!r})
refused = []
for tid in range(1, len(btf)):
    t = btf.get(tid)
    for call in (lambda: btf.type_name(t), lambda: btf.format_type(t),
                 lambda: btf.member_names(btf.resolve(t)), lambda: btf.sizeof(t),
                 lambda: btf.field(t, "nosuch"), lambda: btf.field(t, "x")):
        try:
            call()
        except VmmError as e:
            refused.append(str(e))
print(refused)
want = {want!r}
assert not want or any(want in r for r in refused), (want, refused)
"""


def _btf_case(builder: BtfBuilder, want: str = "") -> None:
    _run_bounded(EXERCISE_BTF.format(blob=builder.blob(), want=want), timeout=30)


def test_btf_struct_containing_itself_through_anonymous_members():
    b = BtfBuilder()
    i = b.int_()
    s = b.struct_("loop", 8, [("x", i, 0), ("", 3, 32)])  # id 2: anon member -> id 3
    b.struct_("", 8, [("", s, 0)])  # id 3: anon member -> id 2
    _btf_case(b, want="type 2")


def test_btf_array_of_itself():
    b = BtfBuilder()
    b.int_()
    a = b.array(2, 4)  # id 2: element type is itself
    b.struct_("holder", 16, [("x", a, 0)])
    _btf_case(b, want="type 2")


def test_btf_function_pointer_parameters_pointing_back():
    b = BtfBuilder()
    b.int_()
    # id 2: proto(int)(p3, p3); id 3: pointer to id 2: a cycle through parameters
    b.proto(1, [3, 3])
    b.ptr(2)
    b.struct_("ops", 8, [("x", 3, 0)])
    _btf_case(b)


def test_btf_exponential_dags_stay_linear():
    b = BtfBuilder()
    b.int_()
    depth = 48
    # protos: each has two parameters pointing to the next one (2**48 paths)
    first = len(b.types) + 1
    for k in range(depth):
        b.proto(1, [first + 2 * k + 1, first + 2 * k + 1])  # id first+2k
        b.ptr(first + 2 * k + 2 if k + 1 < depth else 1)  # id first+2k+1
    # structs: each has two anonymous members of the next one
    top = len(b.types) + 1
    for k in range(depth):
        nxt = top + k + 1
        if k + 1 < depth:
            b.struct_("", 8, [("", nxt, 0), ("", nxt, 0)])
        else:
            b.struct_("", 8, [("leaf", 1, 0)])
    b.struct_("top", 8, [("", top, 0), ("fp", first + 1, 0)])
    _btf_case(b)


# -- /dev/kvm permission advice follows the device's actual mode ------------------------
def test_kvm_permission_advice_for_root_only_device():
    from vmm.kvm.kvm import permission_advice

    text = permission_advice("/dev/kvm", mode=0o020600, uid=0, gid=0, group_name="root",
                             my_groups=[1000], my_uid=1000)
    assert "0600" in text and "root:root" in text
    assert "usermod" not in text  # there is no group to join
    assert "MODE=\"0660\"" in text or "chmod" in text


def test_kvm_permission_advice_for_group_device():
    from vmm.kvm.kvm import permission_advice

    text = permission_advice("/dev/kvm", mode=0o020660, uid=0, gid=108, group_name="kvm",
                             my_groups=[1000], my_uid=1000)
    assert "usermod -aG kvm" in text
    text = permission_advice("/dev/kvm", mode=0o020660, uid=0, gid=108, group_name="kvm",
                             my_groups=[1000, 108], my_uid=1000)
    assert "usermod" not in text and ("ACL" in text or "security" in text)
