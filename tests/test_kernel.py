"""Kernel.load combinations, the on-disk cache, and the CLI text helpers."""

import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
import kfixture  # noqa: E402

from vmm.errors import ImageError, KernelFeatureMissing  # noqa: E402
from vmm.kernel import Kernel, format_btf, format_symbols  # noqa: E402
from vmm.kernel import cache  # noqa: E402

pytestmark = pytest.mark.skipif(kfixture.missing_tools() is not None,
                                reason=f"fixture build: {kfixture.missing_tools()}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))


def test_load_vmlinux():
    k = Kernel.load(vmlinux=kfixture.linked())
    assert k.has_btf and k.build_id
    assert k.symbol("int3_selftest") == 0xFFFFFFFF8100002D
    assert k.is_percpu("runqueues_fx") and not k.is_percpu("global_outer")
    assert k.enum("GREEN") == 5
    assert k.percpu_style == "absolute"
    assert k.var_type("runqueues_fx").name == "rq_fx"
    assert k.btf.offsetof("struct rq_fx", "scx.flags") == 16


def test_load_from_bytes_and_system_map(tmp_path):
    elf = kfixture.linked()
    smap = tmp_path / "System.map"
    smap.write_text("ffffffff81000000 T _text\nffffffff82000000 D jiffies\n")
    k = Kernel.load(system_map=smap, btf=Kernel.load(vmlinux=elf).btf.data)
    assert k.symbol("jiffies") == 0xFFFFFFFF82000000 and k.has_btf
    k2 = Kernel.load(vmlinux=elf.read_bytes())
    assert k2.symbol("_start") == Kernel.load(vmlinux=elf).symbol("_start")


def test_no_btf(tmp_path):
    smap = tmp_path / "System.map"
    smap.write_text("ffffffff81000000 T _text\n")
    k = Kernel.load(system_map=smap)
    assert not k.has_btf
    with pytest.raises(KernelFeatureMissing, match="BTF"):
        k.btf


def test_load_needs_something():
    with pytest.raises(ImageError):
        Kernel.load()


def symtab_entry(k):
    return cache.entry_path(cache.symtab_key(k.elf))


def test_cache_written_keyed_by_content_and_reused():
    elf = kfixture.linked()
    k = Kernel.load(vmlinux=elf)
    entry = symtab_entry(k)
    assert entry.exists()
    # A cache hit serves the pickled table: prove it by planting a marker symbol.
    version, key, value = pickle.loads(entry.read_bytes())
    value.append(("from_cache", 1 << 63, 0, "T", ".text", False))
    entry.write_bytes(pickle.dumps((version, key, value)))
    assert Kernel.load(vmlinux=elf).symbol("from_cache") == 1 << 63


def test_corrupt_cache_is_ignored_and_rewritten():
    elf = kfixture.linked()
    k = Kernel.load(vmlinux=elf)
    entry = symtab_entry(k)
    entry.write_bytes(b"garbage")
    k2 = Kernel.load(vmlinux=elf)
    assert k2.symbol("_start") == k.symbol("_start")
    assert pickle.loads(entry.read_bytes())[1] == symtab_entry(k).stem


def test_format_helpers():
    k = Kernel.load(vmlinux=kfixture.linked())
    assert "runqueues_fx" in format_symbols(k, "runqueues_fx")
    assert "per-CPU" in format_symbols(k, "runqueues_fx")
    assert "build id" in format_symbols(k)
    assert format_symbols(k, "runqueues_*").count("\n") == 0
    assert "pcpu_counter_fx" in format_symbols(k, "*_fx")
    assert format_symbols(k, "0xffffffff8100004e").endswith("_start+0x2")
    assert "no symbol matches" in format_symbols(k, "zz*")
    assert "offset 16" in format_btf(k, "struct rq_fx", "scx.flags")
    assert "GREEN = 5" in format_btf(k, "GREEN")
    assert "struct outer {" in format_btf(k, "outer")
    assert "bits 3..7" in format_btf(k, "bits", "y")


def test_load_bzimage_with_system_map(tmp_path):
    """The distro path: BTF from the vmlinux inside a bzImage, symbols from System.map."""
    images = pytest.importorskip("vmm.image.formats")
    from fuzz.synthetic_images import compress, make_bzimage

    elf = kfixture.linked()
    stripped = tmp_path / "vmlinux"
    import subprocess

    subprocess.run(["strip", "-o", str(stripped), str(elf)], check=True)  # no .symtab, like Debian's
    bz = make_bzimage(compress("gzip", stripped.read_bytes()))
    assert images.extract_vmlinux(bz) == stripped.read_bytes()
    smap = tmp_path / "System.map"
    nm = subprocess.run(["nm", "-n", str(elf)], capture_output=True, text=True, check=True).stdout
    smap.write_text(nm)
    k = Kernel.load(bzimage=bz, system_map=smap)
    assert k.has_btf and k.build_id == Kernel.load(vmlinux=elf).build_id
    assert k.symbol("runqueues_fx") == Kernel.load(vmlinux=elf).symbol("runqueues_fx")
    assert k.is_percpu("runqueues_fx") and not k.is_percpu("global_outer")
    assert k.btf.offsetof("struct rq_fx", "scx.flags") == 16


def test_cache_entry_of_wrong_shape_is_recomputed():
    elf = kfixture.linked()
    k = Kernel.load(vmlinux=elf)
    entry = symtab_entry(k)
    version, key, _ = pickle.loads(entry.read_bytes())
    entry.write_bytes(pickle.dumps((version, key, [("too", "short")])))
    assert Kernel.load(vmlinux=elf).symbol("_start") == k.symbol("_start")


def test_no_file_descriptor_kept_open():
    import os

    before = len(os.listdir("/proc/self/fd"))
    k = Kernel.load(vmlinux=kfixture.linked())
    k.btf.field("struct outer", "first")
    k.elf.read_va(k.symbol("linux_banner"), 8)
    assert len(os.listdir("/proc/self/fd")) == before
