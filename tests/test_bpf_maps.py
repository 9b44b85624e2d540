"""m.bpf: BPF maps read from guest memory through BTF (vmm/kernel/bpf_maps.py).

Our PVM hosts cannot load a BPF program in a guest, so the kernel's objects are laid out
in a sparse fake memory at the offsets of the real BTF of our Linux 7.3 build (skipped
when it is not built): map_idr's xarray with a node level (ids above 63), an array map
with a struct value, a per-CPU array, and the .bss/.data/.rodata maps of one object whose
BTF is tests/data/bpf_maps_fixture.bpf.c compiled by clang (the one `vmm scx build`
uses; skipped without it / its llvm-objcopy), with libbpf's DATASEC fix-up redone here. The proof with real schedulers
(scx_qmap's own .bss counters growing) belongs to the SVM lane.
"""

import glob
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
import kfixture  # noqa: E402

from vmm.errors import (FieldPathError, InvalidValue, KernelFeatureMissing, TargetError,  # noqa: E402
                        VmmError)
from vmm.kernel.bpf_maps import (BpfLayout, BpfMap, BpfMapError, BpfView, WriteEntry,  # noqa: E402
                                 decode_value, walk_xarray)
from vmm.kernel.btf import DATASEC, Btf  # noqa: E402

HERE = Path(__file__).parent
SOURCE = HERE / "data" / "bpf_maps_fixture.bpf.c"
ROOT_NODE = 0xFFFF888000400000
NODE_A = 0xFFFF888000401000
NODE_B = 0xFFFF888000402000
ARRAY_MAP = 0xFFFF888000500000      # struct bpf_array (kmalloc'd: direct map)
PCPU_MAP = 0xFFFF888000510000
BSS_MAP = 0xFFFF888000520000
DATA_MAP = 0xFFFF888000530000
RODATA_MAP = 0xFFFF888000540000
NOBTF_MAP = 0xFFFF888000550000
BTF_OBJ = 0xFFFF888000600000        # struct btf
BTF_DATA = 0xFFFFC90000010000       # its blob (kvmalloc: vmalloc space)
PCPU_PTR = 0x3A000                  # a __percpu pointer
PCPU_OFFSETS = [0xFFFF888010000000, 0xFFFF888010100000]
XA_ZERO = (257 << 2) | 2            # xa_mk_internal(257)
XA_SIBLING = (3 << 2) | 2


def _vmlinux():
    found = sorted(glob.glob(str(Path.home() / ".cache/vmm/kernels/build/7.3-*/vmlinux")))
    return found[0] if found else None


@pytest.fixture(scope="module")
def kern():
    path = _vmlinux()
    if path is None:
        pytest.skip("Linux 7.3 is not built (~/.cache/vmm/kernels/build/7.3-*/vmlinux): "
                    "make kernel-build; the maps are laid out at its BTF's offsets")
    from vmm.kernel import Kernel
    return Kernel.load(vmlinux=path)


def fixed_up_btf(obj: Path) -> bytes:
    """The object's .BTF as libbpf loads it: each DATASEC's size and its variables'
    offsets filled in from the ELF (clang leaves them 0)."""
    from elftools.elf.elffile import ELFFile
    out = obj.with_suffix(".btf")
    subprocess.run([_objcopy(), f"--dump-section=.BTF={out}", str(obj), "/dev/null"],
                   check=True, capture_output=True)
    blob = bytearray(out.read_bytes())
    btf = Btf(bytes(blob))
    with open(obj, "rb") as f:
        elf = ELFFile(f)
        syms = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}
        for tid in btf.ids_of_kind(DATASEC):
            t = btf.get(tid)
            sec = elf.get_section_by_name(t.name)
            pos = btf._offsets[tid]
            struct.pack_into("<I", blob, pos + 8, sec["sh_size"])
            for i, v in enumerate(t.secinfo):
                struct.pack_into("<I", blob, pos + 12 + 12 * i + 4, syms[btf.get(v.type_id).name])
    return bytes(blob)


def _clang() -> str:
    from vmm import scxbuild

    try:
        return scxbuild.find_toolchain().clang
    except scxbuild.ScxBuildError as e:
        pytest.skip(f"the map BTF fixture is compiled with clang: {e}")


def _objcopy() -> str:
    major = re.search(r"clang-(\d+)$", _clang())
    for tool in ([f"llvm-objcopy-{major.group(1)}"] if major else []) + ["llvm-objcopy"]:
        if shutil.which(tool):
            return tool
    pytest.skip("llvm-objcopy not installed (scripts/install-deps.sh: llvm-22): the map BTF "
                "fixture's .BTF is taken out with it")


@pytest.fixture(scope="module")
def obj_btf(tmp_path_factory):
    _objcopy()
    obj = tmp_path_factory.mktemp("bpf") / "fixture.o"
    subprocess.run([_clang(), "-g", "-O2", "-target", "bpf", "-c", str(SOURCE), "-o", str(obj)],
                   check=True, capture_output=True)
    return fixed_up_btf(obj)


class FakeLive(kfixture.FakeLive):
    """What BpfView needs of a LiveKernel, over a sparse memory addressed by kva."""

    def possible_cpus(self):
        return [0, 1]

    def per_cpu_offset(self, cpu):
        if cpu not in (0, 1):
            raise TargetError(f"cpu {cpu} does not exist: nr_cpu_ids is 2")
        return PCPU_OFFSETS[cpu]

    def apply(self, entries):
        """A cold batch's effect: each entry stored (the session's ops path does this)."""
        for e in entries:
            data = e.value if isinstance(e.value, bytes) else e.value.to_bytes(e.width, "little")
            assert len(data) == e.width
            self.put(e.kva, data)
        return entries


def _pack(btf, type_name, values, size):
    """Bytes of a struct laid out at the BTF's offsets: values {member: (fmt, value)}."""
    raw = bytearray(size)
    t = btf.type(type_name)
    for name, (fmt, v) in values.items():
        struct.pack_into(fmt, raw, btf.offsetof(t, name), *(v if isinstance(v, tuple) else (v,)))
    return raw


class Guest:
    """The fake kernel: map_idr -> xarray (root node shift 6 -> two leaf nodes) -> maps
    with ids 1, 2, 3, 4 (node A), 70 and 71 (node B: 70 = 1 * 64 + 6)."""

    def __init__(self, kern, obj_btf):
        self.kern, self.btf = kern, Btf(obj_btf)
        self.live = live = FakeLive(kern)
        self.lay = lay = BpfLayout.of(kern)
        kb = kern.btf
        self.value_off = kb.offsetof("struct bpf_array", "value")
        idr = live.symbol_address("map_idr")
        live.put(idr, bytes(kb.sizeof("struct idr")))
        live.u64(idr + lay.idr_head_off, ROOT_NODE | 2)
        # the object's BTF
        live.put(BTF_OBJ, bytes(kb.sizeof("struct btf")))
        live.u64(BTF_OBJ + kb.offsetof("struct btf", "data"), BTF_DATA)
        live.u32(BTF_OBJ + kb.offsetof("struct btf", "data_size"), len(obj_btf))
        live.put(BTF_DATA, obj_btf)
        b = self.btf
        sid = b.type("struct stats").id
        pid = b.type("struct pcpu_ctr").id
        bss, data, rodata = (b.type(n).id for n in (".bss", ".data", ".rodata"))
        u32 = b.type("u32").id
        self.stats_size = b.sizeof("struct stats")
        self.pcpu_size = b.sizeof("struct pcpu_ctr")
        # (kva, id, type, value size, max_entries, name, key type, value type, btf)
        self.maps = [
            (ARRAY_MAP, 1, 2, self.stats_size, 4, b"stats_map", u32, sid, BTF_OBJ),
            (PCPU_MAP, 2, 6, self.pcpu_size, 2, b"pcpu_map", u32, pid, BTF_OBJ),
            (BSS_MAP, 3, 2, b.sizeof(b.type(".bss")), 1, b"bpf_maps_f.bss", 0, bss, BTF_OBJ),
            (RODATA_MAP, 4, 2, 4, 1, b"bpf_maps.rodata", 0, rodata, BTF_OBJ),
            (DATA_MAP, 70, 2, b.sizeof(b.type(".data")), 1, b"bpf_maps_f.data", 0, data, BTF_OBJ),
            (NOBTF_MAP, 71, 2, 12, 2, b"raw_counts", 0, 0, 0),
        ]
        for kva, mid, mtype, vsize, maxe, name, kt, vt, btf in self.maps:
            live.put(kva, bytes(self.value_off + 8 * maxe))
            o = lay.map
            for member, v in (("map_type", mtype), ("key_size", 4), ("value_size", vsize),
                              ("max_entries", maxe), ("id", mid), ("btf_key_type_id", kt),
                              ("btf_value_type_id", vt)):
                live.u32(kva + o[member], v)
            live.u64(kva + o["btf"], btf)
            live.put(kva + o["name"], name.ljust(16, b"\0"))
            live.u32(kva + lay.array_elem_size_off, (vsize + 7) // 8 * 8)
        live.u64(PCPU_MAP + lay.array_pptrs_off, PCPU_PTR)
        live.u64(PCPU_MAP + lay.array_pptrs_off + 8, PCPU_PTR + 0x40)
        # the xarray: root (shift 6) -> A (shift 0: 1..4), B (shift 0: 70, 71)
        for node, shift in ((ROOT_NODE, 6), (NODE_A, 0), (NODE_B, 0)):
            live.put(node, bytes(kb.sizeof("struct xa_node")))
            live.put(node + lay.node_shift_off, bytes([shift]))
        slot = lambda node, i, v: live.u64(node + lay.node_slots_off + 8 * i, v)  # noqa: E731
        slot(ROOT_NODE, 0, NODE_A | 2)
        slot(ROOT_NODE, 1, NODE_B | 2)
        for kva, mid, *_ in self.maps:
            slot(NODE_A if mid < 64 else NODE_B, mid % 64, kva)
        slot(NODE_A, 5, XA_ZERO)       # reserved, no map
        slot(NODE_A, 9, XA_SIBLING)    # a sibling entry, no map
        slot(NODE_A, 11, (99 << 1) | 1)  # a value entry, no map

    def put_value(self, kva, key, raw):
        elem = (len(raw) + 7) // 8 * 8
        self.live.put(kva + self.value_off + elem * key, bytes(raw))

    def view(self):
        return BpfView(self.kern, live=lambda: self.live, write=self.live.apply)


@pytest.fixture
def guest(kern, obj_btf):
    return Guest(kern, obj_btf)


# --- listing ------------------------------------------------------------------------------
def test_layout_of_73(kern):
    lay = BpfLayout.of(kern)
    assert lay.chunk == 64 and lay.name_len == 16
    assert lay.array_value_off == lay.array_pptrs_off == 280
    assert lay.types[2] == "array" and lay.types[6] == "percpu_array" and lay.types[1] == "hash"
    assert lay.types[19] == "cgroup_storage"  # not the _DEPRECATED alias of the same value


def test_maps_lists_every_map_through_the_node_level(guest):
    maps = guest.view().maps()
    assert [(m.id, m.name, m.type, m.key_size, m.value_size, m.max_entries) for m in maps] == [
        (1, "stats_map", "array", 4, guest.stats_size, 4),
        (2, "pcpu_map", "percpu_array", 4, guest.pcpu_size, 2),
        (3, "bpf_maps_f.bss", "array", 4, 28, 1),
        (4, "bpf_maps.rodata", "array", 4, 4, 1),
        (70, "bpf_maps_f.data", "array", 4, 6, 1),
        (71, "raw_counts", "array", 4, 12, 2)]
    assert maps[0].kva == ARRAY_MAP and maps[0].btf == BTF_OBJ
    assert maps[0].describe() == f"1: array  name stats_map  key 4B  value {guest.stats_size}B  max_entries 4"
    assert "view" not in maps[0].as_dict() and maps[0].as_dict()["id"] == 1
    assert maps[0].value_type() == "struct stats"
    assert maps[2].value_type() == "DATASEC .bss" and maps[5].value_type() is None


def test_walk_xarray_shapes(guest):
    lay, read = guest.lay, guest.live.read_kva
    assert walk_xarray(read, 0, lay) == []
    assert walk_xarray(read, ARRAY_MAP, lay) == [(0, ARRAY_MAP)]   # a lone entry at index 0
    assert walk_xarray(read, XA_ZERO, lay) == []
    assert [i for i, _ in walk_xarray(read, NODE_A | 2, lay)] == [1, 2, 3, 4]
    guest.live.put(NODE_B + lay.node_shift_off, bytes([12]))     # not the parent's shift - 6
    with pytest.raises(VmmError, match="shift 12, expected 0"):
        walk_xarray(read, ROOT_NODE | 2, lay)
    guest.live.put(NODE_B + lay.node_shift_off, bytes([0]))
    guest.live.u64(NODE_B + lay.node_slots_off, NODE_B | 2)       # a loop
    with pytest.raises(VmmError, match="below leaf node|more than"):
        walk_xarray(read, ROOT_NODE | 2, lay, max_nodes=50)


def test_map_by_name_suggests_and_finds_sections(guest):
    view = guest.view()
    assert view.map("stats_map").id == 1
    assert view.map(".bss").id == 3 and view.map(".data").id == 70  # the one ending so
    assert view.map(70).name == "bpf_maps_f.data"
    with pytest.raises(BpfMapError, match=r"no BPF map named 'stats_mp' \(did you mean: stats_map"):
        view.map("stats_mp")
    with pytest.raises(BpfMapError, match="no BPF map with id 5"):
        view.map(5)


# --- values -------------------------------------------------------------------------------
def test_array_map_struct_value(guest):
    b = guest.btf
    raw = _pack(b, "struct stats", {"nr_enq": ("<Q", 123456789012), "nr_deq": ("<I", 7),
                                    "delta": ("<i", -3), "tag": ("8s", b"qmap\0\0\0\0"),
                                    "small": ("<H", 65535), "qm": ("<I", 7), "on": ("<B", 1),
                                    "hist": ("<3I", (10, 20, 30))}, guest.stats_size)
    flag_byte = b.field("struct stats", "flag").offset
    raw[flag_byte] = 0b1011  # flag = 1, mode = 0b101
    guest.put_value(ARRAY_MAP, 2, raw)
    m = guest.view().map("stats_map")
    assert m.read(2) == {"nr_enq": 123456789012, "nr_deq": 7, "delta": -3, "tag": b"qmap\0\0\0\0",
                         "flag": 1, "mode": 5, "small": 65535, "qm": 7, "on": True,
                         "hist": [10, 20, 30]}
    assert m.read(0)["nr_enq"] == 0 and m.read_raw(2) == bytes(raw)
    with pytest.raises(BpfMapError, match="key 4 is out of range"):
        m.read(4)


def test_percpu_array_gives_one_value_per_cpu(guest):
    for cpu, (cnt, seen) in enumerate(((5, 1), (9, 2))):
        guest.live.put(PCPU_PTR + 0x40 + PCPU_OFFSETS[cpu], struct.pack("<QI", cnt, seen))
    m = guest.view().map("pcpu_map")
    assert m.read(1) == [{"cnt": 5, "seen": 1}, {"cnt": 9, "seen": 2}]
    assert m.read(1, cpu=1) == {"cnt": 9, "seen": 2}
    with pytest.raises(TargetError, match="cpu 7 does not exist"):
        m.read(1, cpu=7)


def test_global_data_sections(guest):
    live = guest.live
    live.put(BSS_MAP + guest.value_off, struct.pack("<Q6s2x3I", 42, b"fifo\0\0", 1, 2, 3))
    live.put(DATA_MAP + guest.value_off, struct.pack("<ih", 2, -5))
    live.put(RODATA_MAP + guest.value_off, struct.pack("<I", 20000))
    view = guest.view()
    assert view.map(".bss").read() == {"nr_enqueued": 42, "mode_name": b"fifo\0\0",
                                       "dispatched": [1, 2, 3]}
    assert view.map(".data").read() == {"nr_cpus": 2, "offset_ns": -5}
    assert view.map(".rodata").read() == {"slice_us": 20000}


def test_map_without_btf_reads_bytes(guest):
    guest.put_value(NOBTF_MAP, 1, b"abcdefghijkl")
    m = guest.view().map("raw_counts")
    assert m.read(1) == b"abcdefghijkl"
    with pytest.raises(BpfMapError, match="no BTF to name fields"):
        m.write(1, {"x": 1})
    m.write(1, {"": b"ABCDEFGHIJKL"})
    assert m.read(1) == b"ABCDEFGHIJKL"


def test_a_freed_map_is_noticed(guest):
    m = guest.view().map("stats_map")
    guest.live.u32(ARRAY_MAP + guest.lay.map["id"], 99)
    with pytest.raises(BpfMapError, match="id 1.* is gone"):
        m.read(0)


def test_decode_value_kinds(obj_btf):
    b = Btf(obj_btf)
    assert decode_value(b, b.type("s16").id, b"\xfe\xff") == -2
    assert decode_value(b, b.type("enum qmode").id, struct.pack("<I", 1)) == 1
    assert decode_value(b, 0, b"\x01\x02") == b"\x01\x02"  # void: raw bytes


# --- writes -------------------------------------------------------------------------------
def test_write_struct_fields(guest):
    view = guest.view()
    m = view.map("stats_map")
    plan = view.plan_write(m, 1, {"nr_enq": 5, "delta": -1, "tag": "abc", "small": 300})
    b = guest.btf
    base = ARRAY_MAP + guest.value_off + (guest.stats_size + 7) // 8 * 8
    assert [(e.kva - base, e.width, e.value) for e in plan] == [
        (0, 8, 5), (b.offsetof("struct stats", "delta"), 4, 0xFFFFFFFF),
        (b.offsetof("struct stats", "tag"), 8, b"abc\0\0\0\0\0"),
        (b.offsetof("struct stats", "small"), 2, (300).to_bytes(2, "little"))]
    m.write(1, {"nr_enq": 5, "delta": -1, "tag": "abc", "small": 300, "hist[1]": 77})
    got = m.read(1)
    assert (got["nr_enq"], got["delta"], got["tag"], got["small"], got["hist"]) == \
        (5, -1, b"abc\0\0\0\0\0", 300, [0, 77, 0])


def test_write_sections_and_per_cpu(guest):
    view = guest.view()
    view.map(".bss").write(0, {"nr_enqueued": 1 << 40, "dispatched[2]": 9})
    view.map(".data").write(0, {"offset_ns": -32768})
    assert view.map(".bss").read() == {"nr_enqueued": 1 << 40, "mode_name": bytes(6),
                                       "dispatched": [0, 0, 9]}
    assert view.map(".data").read()["offset_ns"] == -32768
    p = view.map("pcpu_map")
    p.write(0, {"cnt": 3})
    assert [v["cnt"] for v in p.read(0)] == [3, 3]
    p.write(0, {"cnt": 4}, cpu=1)
    assert [v["cnt"] for v in p.read(0)] == [3, 4]


def test_a_bad_write_changes_nothing(guest):
    """Every change is checked before the batch: an unknown field (close names
    suggested), a width or range that does not fit, a bitfield, a bad key."""
    view = guest.view()
    m = view.map("stats_map")
    writes = []
    checked = BpfView(guest.kern, live=lambda: guest.live, write=writes.append)
    cm = checked.map("stats_map")
    for changes, err, pattern in (
            ({"nr_enq": 1, "nr_enqq": 2}, FieldPathError, r"no member 'nr_enqq' .*did you mean: .*nr_enq"),
            ({"nr_deq": 1 << 32}, InvalidValue, r"does not fit u32 \(4 bytes, 0..4294967295\)"),
            ({"delta": -(1 << 31) - 1}, InvalidValue, "does not fit int"),
            ({"tag": b"12345"}, InvalidValue, "5 bytes for a 8-byte field.*width must match"),
            ({"tag": "12345678"}, InvalidValue, "needs 9 bytes with its NUL"),
            ({"mode": 1}, TargetError, "3-bit bitfield"),
            ({"nr_enq": "x"}, InvalidValue, "cannot store str"),
            ({}, InvalidValue, "non-empty dict")):
        with pytest.raises(err, match=pattern):
            cm.write(0, changes)
    with pytest.raises(FieldPathError, match=r"no variable 'nr_enqueue' \(did you mean: nr_enqueued"):
        checked.map(".bss").write(0, {"nr_enqueue": 1})
    with pytest.raises(BpfMapError, match="key 9 is out of range"):
        cm.write(9, {"nr_enq": 1})
    with pytest.raises(BpfMapError, match="not per-CPU"):
        cm.write(0, {"nr_enq": 1}, cpu=0)
    assert writes == [] and m.read(0)["nr_enq"] == 0


def test_write_goes_through_one_batch_in_a_freeze(guest):
    held, batches = [], []

    class Freeze:
        def __enter__(self):
            held.append(True)

        def __exit__(self, *a):
            held.pop()

    view = BpfView(guest.kern, live=lambda: guest.live, freeze=Freeze,
                   frozen=lambda: bool(held), write=lambda e: batches.append((list(e), bool(held))))
    view.map("pcpu_map", freeze=False).write(1, {"cnt": 1, "seen": 2})
    [(entries, frozen)] = batches
    assert frozen and len(entries) == 4 and all(isinstance(e, WriteEntry) for e in entries)
    assert entries[0].description == "map 'pcpu_map' key 1 cnt cpu 0"


# --- refusals -----------------------------------------------------------------------------
def test_kernel_without_bpf_syscall_or_btf_is_refused():
    with pytest.raises(KernelFeatureMissing, match="no map_idr.*CONFIG_BPF_SYSCALL"):
        BpfLayout.of(SimpleNamespace(symbols={}, has_btf=True))
    with pytest.raises(KernelFeatureMissing, match="no BTF"):
        BpfLayout.of(SimpleNamespace(symbols={"map_idr": 1}, has_btf=False))


HASH_MAP = 0xFFFF888000560000
BUCKETS = 0xFFFF888000570000
ELEMS = [0xFFFF888000580000, 0xFFFF888000580100, 0xFFFF888000580200]


def add_hash_map(guest, mid, mtype, name, percpu=False):
    """A struct bpf_htab (id ``mid``) with 4 buckets: bucket 0 chains keys 7 then 9,
    bucket 2 holds key 1, buckets 1 and 3 are empty (their nulls markers)."""
    live, lay, kb = guest.live, guest.lay, guest.kern.btf
    h = lay.hash
    b = guest.btf
    live.put(HASH_MAP, bytes(kb.sizeof("struct bpf_htab")))
    o = lay.map
    for member, v in (("map_type", mtype), ("key_size", 4), ("value_size", guest.pcpu_size),
                      ("max_entries", 8), ("id", mid), ("btf_key_type_id", b.type("u32").id),
                      ("btf_value_type_id", b.type("struct pcpu_ctr").id)):
        live.u32(HASH_MAP + o[member], v)
    live.u64(HASH_MAP + o["btf"], BTF_OBJ)
    live.put(HASH_MAP + o["name"], name.ljust(16, b"\0"))
    live.u64(HASH_MAP + h["buckets"], BUCKETS)
    live.u32(HASH_MAP + h["n_buckets"], 4)
    for i in range(4):
        live.put(BUCKETS + 16 * i, bytes(16))
        live.u64(BUCKETS + 16 * i + h["head_first"], (i << 1) | 1)   # empty: a nulls marker
    live.u64(BUCKETS + h["head_first"], ELEMS[0] + h["node"])
    live.u64(BUCKETS + 32 + h["head_first"], ELEMS[2] + h["node"])
    chain = {0: ELEMS[1] + h["node"], 1: 1, 2: 5}                     # next pointers
    for n, (elem, key, cnt) in enumerate(zip(ELEMS, (7, 9, 1), (70, 90, 10))):
        live.put(elem, bytes(0x100))
        live.u64(elem + h["node"] + h["next"], chain[n])
        live.u32(elem + h["key"], key)
        value = elem + h["key"] + 8
        if percpu:
            pptr = 0x50000 + 0x100 * n
            live.u64(value, pptr)
            for c in (0, 1):
                live.put(pptr + PCPU_OFFSETS[c], struct.pack("<QI", cnt + c, c))
        else:
            live.put(value, struct.pack("<QI", cnt, 1))
    node = NODE_B + lay.node_slots_off + 8 * (mid % 64)
    live.u64(node, HASH_MAP)


def test_hash_map_is_read_only(guest):
    add_hash_map(guest, 72, 1, b"pids")
    view = guest.view()
    m = view.map("pids")
    assert (m.id, m.type) == (72, "hash")
    assert m.items() == [(7, {"cnt": 70, "seen": 1}), (9, {"cnt": 90, "seen": 1}),
                         (1, {"cnt": 10, "seen": 1})]
    assert m.read(9) == {"cnt": 90, "seen": 1}
    with pytest.raises(BpfMapError, match="no element with key 8"):
        m.read(8)
    with pytest.raises(BpfMapError, match="read-only for hash maps"):
        m.write(7, {"cnt": 1})


def test_percpu_hash_map(guest):
    add_hash_map(guest, 73, 5, b"pcpu_pids", percpu=True)
    m = guest.view().map("pcpu_pids")
    assert m.type == "percpu_hash"
    assert m.read(1) == [{"cnt": 10, "seen": 0}, {"cnt": 11, "seen": 1}]
    assert m.items(cpu=1)[0] == (7, {"cnt": 71, "seen": 1})


def test_array_items(guest):
    guest.put_value(NOBTF_MAP, 1, b"abcdefghijkl")
    assert guest.view().map("raw_counts").items() == [(0, bytes(12)), (1, b"abcdefghijkl")]


def test_other_map_types_are_refused_for_values(guest):
    guest.live.u32(ARRAY_MAP + guest.lay.map["map_type"], 27)
    m = guest.view().map("stats_map")
    assert m.type == "ringbuf"
    with pytest.raises(BpfMapError, match="is a ringbuf map: values are read for array"):
        m.read(0)
    with pytest.raises(BpfMapError, match="items\\(\\) reads array and hash"):
        m.items()


def test_no_map_loaded(guest):
    guest.live.u64(guest.live.symbol_address("map_idr") + guest.lay.idr_head_off, 0)
    view = guest.view()
    assert view.maps() == []
    with pytest.raises(BpfMapError, match="no map is loaded"):
        view.map("stats_map")


def test_bpfmap_without_a_view():
    with pytest.raises(VmmError, match="not listed through a view"):
        BpfMap(1, "x", "array", 4, 4, 1).read()


def test_session_turns_the_plan_into_one_checked_cold_batch():
    """m.bpf's writes: the planned stores become raw-kva targets of the field's width
    through the ops path (its own width checks apply), applied in one rendezvous."""
    sys.path.insert(0, str(HERE))
    from fake_resolver import Rendezvous, TableResolver

    from vmm.kvm.memory import GuestMemory
    from vmm.ops import Op, apply_op
    from vmm.session import Machine

    base = 0xFFFFFFFF80000000  # TableResolver: gpa = kva - base
    entries = [WriteEntry(base + 0x100, 8, 1 << 40, "a u64"),
               WriteEntry(base + 0x108, 4, 0xFFFFFFFF, "a u32"),
               WriteEntry(base + 0x10C, 2, b"\x34\x12", "a u16"),
               WriteEntry(base + 0x110, 8, b"abc\0\0\0\0\0", "a char[8]")]
    batch = Machine._bpf_batch(entries)
    assert [(str(t), v.width) for t, v in batch] == [
        (f"kva {base + 0x100:#x}", 8), (f"kva {base + 0x108:#x}", 4),
        (f"kva {base + 0x10C:#x}", 2), (f"kva {base + 0x110:#x}", 8)]
    mem = GuestMemory(0x10000)
    try:
        rv = Rendezvous()
        apply_op(Op.WriteKernelCold(batch), mem, lambda snap: TableResolver(), rv)
        assert rv.count == 1
        assert mem.read(0x100, 24) == struct.pack("<QIH2x8s", 1 << 40, 0xFFFFFFFF, 0x1234, b"abc")
    finally:
        mem.close()
