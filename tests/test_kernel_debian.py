"""Our parsers against pahole, nm and System.map on Debian's sched_ext 7.3 cloud
kernel (the -dbg vmlinux, ~400 MB, fetched once into ~/.cache/vmm/kernels/debian).

Slow: `python -m pytest -m slow tests/test_kernel_debian.py`.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pahole_text import pahole_members, pahole_size  # noqa: E402

from vmm.errors import KernelStoreError  # noqa: E402
from vmm.kernel import Kernel, fetch_debug  # noqa: E402
from vmm.kernel.sysmap import parse_system_map  # noqa: E402

pytestmark = pytest.mark.slow

STRUCTS = """rq scx_rq cfs_rq rt_rq dl_rq task_struct sched_ext_entity sched_entity
sched_rt_entity sched_dl_entity load_weight sched_avg scx_dispatch_q mm_struct
vm_area_struct file inode super_block dentry list_head hlist_node hlist_head rb_node
rb_root rb_root_cached raw_spinlock qspinlock mutex rw_semaphore wait_queue_head
timer_list hrtimer work_struct delayed_work kobject device page folio cred pid
signal_struct sighand_struct files_struct fs_struct nsproxy cpumask sk_buff sock
net_device bpf_prog bpf_map irq_desc seq_file module cgroup css_set task_group
thread_struct fpu pt_regs callback_head llist_node rcu_head sched_class
sched_domain root_domain uclamp_rq scx_sched kernfs_node address_space""".split()
ENUMS = ["scx_rq_flags", "scx_ent_flags", "scx_enq_flags", "scx_kick_flags", "pid_type",
         "hrtimer_restart", "zone_type", "migratetype"]


@pytest.fixture(scope="module")
def vmlinux():
    if shutil.which("pahole") is None:
        pytest.skip("pahole (dwarves) not installed")
    path = fetch_debug.find_cached()
    if path is None:
        try:
            from vmm import kernelstore

            path = kernelstore.fetch_debug_vmlinux()
        except KernelStoreError as e:
            pytest.skip(f"Debian debug vmlinux not cached and fetch failed: {e}")
    return path


@pytest.fixture(scope="module")
def kernel(vmlinux):
    return Kernel.load(vmlinux=vmlinux)


def pahole(vmlinux, name):
    return subprocess.run(["pahole", "-F", "btf", "-C", name, str(vmlinux)],
                          capture_output=True, text=True).stdout


def test_sched_ext_facts(kernel):
    assert kernel.enum("SCX_RQ_CLK_VALID") == 32
    assert kernel.is_percpu("runqueues") and kernel.percpu_style == "absolute"
    assert kernel.symbol("runqueues") == 0xFFFFFFFF83CF65C0
    assert kernel.var_type("runqueues").name == "rq"


def test_struct_layouts_match_pahole(kernel, vmlinux):
    compared = 0
    for name in STRUCTS:
        text = pahole(vmlinux, name)
        if not text.startswith(("struct", "union")):
            continue
        members = pahole_members(text)
        for path, (off, size, bit) in members.items():
            f = kernel.btf.field(f"struct {name}", path)
            assert (f.offset, f.size) == (off, size), (name, path, f)
            if bit is not None:
                assert f.bit_offset == bit, (name, path)
        assert kernel.btf.sizeof(f"struct {name}") == pahole_size(text), name
        compared += 1
    assert compared >= 50


def test_every_struct_size_matches_pahole(kernel, vmlinux):
    out = subprocess.run(["pahole", "-F", "btf", "--sizes", str(vmlinux)],
                         capture_output=True, text=True).stdout
    sizes = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1].isdigit():
            sizes.setdefault(parts[0], int(parts[1]))
    assert len(sizes) > 5000
    wrong = [(n, s, kernel.btf.sizeof(kernel.btf.type(n))) for n, s in sizes.items()
             if kernel.btf.sizeof(kernel.btf.type(n)) != s]
    assert not wrong, wrong[:10]


def test_enum_values_match_pahole(kernel, vmlinux):
    for name in ENUMS:
        text = pahole(vmlinux, name)
        pairs = re.findall(r"^\t(\w+)\s*=\s*(-?\d+),", text, re.M)
        assert pairs, name
        size = kernel.btf.type(f"enum {name}").size
        for enumerator, value in pairs:
            # pahole 1.24 ignores the signedness kind_flag (SCX_TASK_CURSOR = 1 << 31 is
            # -2147483648 in a signed enum, per btf.rst): compare the bit patterns.
            mask = (1 << 8 * size) - 1
            assert kernel.enum(enumerator) & mask == int(value) & mask, enumerator


def test_symbols_match_system_map(kernel, vmlinux):
    smap = fetch_debug.system_map_for(vmlinux)
    if smap is None:
        pytest.skip("System.map not cached next to the vmlinux")
    ours = kernel.symbols
    from_map = parse_system_map(smap)
    counts = {}
    for s in from_map:
        counts[s.name] = counts.get(s.name, 0) + 1
    checked = 0
    for s in from_map:
        if counts[s.name] == 1 and len(ours.duplicates(s.name)) == 1:
            assert ours.address(s.name) == s.address, s.name
            checked += 1
    assert checked > 100000
    k2 = Kernel.load(system_map=smap)
    assert k2.is_percpu("runqueues") and k2.symbol("runqueues") == ours.address("runqueues")


def test_symbols_match_nm_sample(kernel, vmlinux):
    out = subprocess.run(["nm", "--defined-only", str(vmlinux)], capture_output=True,
                         text=True).stdout
    seen = 0
    for line in out.splitlines()[::50]:
        addr, letter, name = line.split()[:3]
        if len(kernel.symbols.duplicates(name)) == 1:
            s = kernel.symbols.lookup(name)
            assert (s.address, s.type) == (int(addr, 16), letter), name
            seen += 1
    assert seen > 1000


def test_distro_bzimage_with_system_map(kernel, vmlinux):
    """The distro path: vmlinuz (BTF, no .symtab) + the -dbg System.map."""
    vmlinuz = sorted(fetch_debug.cache_dir().glob("*/vmlinuz*"))
    smap = fetch_debug.system_map_for(vmlinux)
    if not vmlinuz or smap is None:
        pytest.skip("no cached Debian vmlinuz (vmm.kernelstore fetch_debian) or System.map")
    k = Kernel.load(bzimage=vmlinuz[-1], system_map=smap)
    if k.build_id != kernel.build_id:
        pytest.skip(f"cached vmlinuz is another build ({k.build_id} vs {kernel.build_id})")
    assert k.enum("SCX_RQ_CLK_VALID") == 32
    assert k.btf.field("struct rq", "scx.flags") == kernel.btf.field("struct rq", "scx.flags")
    assert k.is_percpu("runqueues") and k.symbol("runqueues") == kernel.symbol("runqueues")
