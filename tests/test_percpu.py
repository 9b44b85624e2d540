"""The live view over in-process guest memory: per-CPU addresses in both symbol
styles, image/direct-map translation, typed reads. The fixture ELF is laid into a
FakeMemory the way a booted kernel would be (image at physical 16 MiB)."""

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
import kfixture  # noqa: E402

from vmm.errors import FieldPathError, TargetError, TranslationError  # noqa: E402
from vmm.kernel import Kernel  # noqa: E402

pytestmark = pytest.mark.skipif(kfixture.missing_tools() is not None,
                                reason=f"fixture build: {kfixture.missing_tools()}")

PAGE_OFFSET = 0xFFFF888000000000
START_KERNEL_MAP = 0xFFFFFFFF80000000
AREA_PHYS = 0x4000000  # where our fake per-CPU areas live (direct map)
AREA_STRIDE = 0x10000


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))


def booted(style):
    """(kernel, memory) with 4 CPUs whose runqueues_fx.scx.flags = 0x20 | cpu."""
    path = kfixture.linked(style)
    k = Kernel.load(vmlinux=path)
    mem = kfixture.FakeMemory()
    kfixture.load_image(mem, path)
    start = k.symbol("__per_cpu_start")
    rq_off = k.btf.offsetof("struct rq_fx", "scx.flags")
    for cpu in range(4):
        area = PAGE_OFFSET + AREA_PHYS + cpu * AREA_STRIDE
        offset = area - start  # what setup_per_cpu_areas() stores
        mem.write_u64(k.symbol("__per_cpu_offset") - START_KERNEL_MAP + 8 * cpu, offset)
        var_gpa = AREA_PHYS + cpu * AREA_STRIDE + (k.symbol("runqueues_fx") - start)
        mem.write(var_gpa, struct.pack("<i", 100 + cpu))  # rq_fx.cpu
        mem.write(var_gpa + rq_off, struct.pack("<I", 0x20 | cpu))
    return k, mem


@pytest.mark.parametrize("style", ["absolute", "relative"])
def test_per_cpu_reads(style):
    k, mem = booted(style)
    assert k.percpu_style == style
    live = k.attach(mem)
    assert live.possible_cpus() == [0, 1, 2, 3]
    for cpu in range(4):
        assert live.read("runqueues_fx", "scx.flags", cpu=cpu) == 0x20 | cpu
        assert live.read("runqueues_fx", "cpu", cpu=cpu) == 100 + cpu
    addr = live.per_cpu_address("runqueues_fx", 2, "scx.flags")
    assert addr == PAGE_OFFSET + AREA_PHYS + 2 * AREA_STRIDE + \
        (k.symbol("runqueues_fx") - k.symbol("__per_cpu_start")) + 16
    assert live.kva_to_gpa(addr) == addr - PAGE_OFFSET
    whole = live.read("runqueues_fx", cpu=1)
    assert isinstance(whole, bytes) and len(whole) == k.btf.sizeof("struct rq_fx")


def test_per_cpu_errors():
    k, mem = booted("absolute")
    live = k.attach(mem)
    with pytest.raises(TargetError, match="per-CPU"):
        live.read("runqueues_fx", "cpu")
    with pytest.raises(TargetError, match="nr_cpu_ids is 4"):
        live.read("runqueues_fx", "cpu", cpu=4)
    with pytest.raises(TargetError, match="not a per-CPU"):
        live.address_of("global_outer", cpu=0)


def test_global_reads_and_image_translation():
    k, mem = booted("absolute")
    live = k.attach(mem)
    assert live.phys_base == 0 and live.slide == 0
    assert live.kva_to_gpa(k.symbol("_text")) == 0x1000000
    assert live.read("nr_cpu_ids") == 4  # symbol size 4, no BTF var
    assert live.read("global_outer", "first", type="struct outer") == 42
    assert isinstance(live.read("global_outer"), bytes)
    with pytest.raises(FieldPathError, match="pass type="):
        live.read("global_outer", "first")


def test_bitfield_and_signed_reads():
    k, mem = booted("absolute")
    live = k.attach(mem)
    f = k.btf.field("struct outer", "bf.s")
    kva = live.address_of("global_outer", type="struct outer") + f.offset
    gpa = live.kva_to_gpa(kva)
    raw = int.from_bytes(mem.read(gpa, 4), "little") | (0b1110 << f.bit_offset)  # s = -2
    mem.write(gpa, raw.to_bytes(4, "little"))
    assert live.read("global_outer", "bf.s", type="struct outer") == -2
    assert live.read("global_outer", "bf.x", type="struct outer") == 0


def test_outside_image_and_direct_map_needs_cr3():
    k, mem = booted("absolute")
    live = k.attach(mem)
    with pytest.raises(TranslationError, match="cr3"):
        live.kva_to_gpa(0xFFFFC90000000000)


def test_reads_follow_pointers_with_arrow():
    k, mem = booted("absolute")
    live = k.attach(mem)
    outer = live.address_of("global_outer", type="struct outer")
    target = outer + k.btf.offsetof("struct outer", "arr[1]")
    mem.write_u64(live.kva_to_gpa(outer + k.btf.offsetof("struct outer", "ptr")), target)
    mem.write(live.kva_to_gpa(target + 4), b"\x7b")  # arr[1].b
    assert live.read("global_outer", "ptr->b", type="struct outer") == 0x7B
    assert live.address_of("global_outer", "ptr->a", type="struct outer") == target
    with pytest.raises(FieldPathError, match="not a pointer"):
        live.read("global_outer", "first->a", type="struct outer")
    mem.write_u64(live.kva_to_gpa(outer + k.btf.offsetof("struct outer", "ptr")), 0)
    with pytest.raises(TargetError, match="NULL"):
        live.read("global_outer", "ptr->b", type="struct outer")
