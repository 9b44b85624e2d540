"""The mission batch refuses kernels that cannot take it, with a message that says why."""

import shutil
import subprocess

import pytest

from vmm.errors import KernelFeatureMissing
from vmm.kernel import Kernel
from vmm.ops import KernelTarget as T, KernelValue as V, clk_valid_mask, scx_clock_batch

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("pahole") is None,
                                reason="needs gcc and pahole (dwarves)")

NO_SCX = "struct rq { int cpu; }; struct rq runqueues;"
OLD_SCX = """
enum scx_rq_flags { SCX_RQ_ONLINE = 1, SCX_RQ_BAL_KEEP = 8 };
struct scx_rq { unsigned int flags; unsigned int nr_immed; };
struct rq { int cpu; struct scx_rq scx; }; struct rq runqueues;
enum scx_rq_flags use_it;
"""
NEW_SCX = """
enum scx_rq_flags { SCX_RQ_ONLINE = 1, SCX_RQ_CLK_VALID = 1 << 5 };
struct scx_rq { unsigned int flags; unsigned int nr_immed; unsigned long long clock; };
struct rq { int cpu; struct scx_rq scx; }; struct rq runqueues;
enum scx_rq_flags use_it;
"""


def kernel_from(tmp_path, source, btf=True):
    c, o = tmp_path / "k.c", tmp_path / "k.o"
    c.write_text(source)
    subprocess.run(["gcc", "-g", "-c", str(c), "-o", str(o)], check=True)
    if btf:
        subprocess.run(["pahole", "-J", str(o)], check=True, capture_output=True)
    return Kernel.load(vmlinux=str(o))


def test_kernel_without_btf_is_refused(tmp_path):
    with pytest.raises(KernelFeatureMissing, match="no BTF.*CONFIG_DEBUG_INFO_BTF"):
        clk_valid_mask(kernel_from(tmp_path, NEW_SCX, btf=False))


def test_kernel_without_sched_ext_is_refused(tmp_path):
    with pytest.raises(KernelFeatureMissing, match="no sched_ext.*CONFIG_SCHED_CLASS_EXT"):
        clk_valid_mask(kernel_from(tmp_path, NO_SCX))


def test_sched_ext_before_6_14_is_refused(tmp_path):
    with pytest.raises(KernelFeatureMissing, match="SCX_RQ_CLK_VALID.*6.14"):
        scx_clock_batch(kernel_from(tmp_path, OLD_SCX), [0, 1], 5)


def test_batch_writes_clock_then_ors_the_flag_per_cpu(tmp_path):
    batch = scx_clock_batch(kernel_from(tmp_path, NEW_SCX), [0, 1], 12345)
    assert batch == [
        (T.per_cpu("runqueues", 0, "scx.clock"), V.u64(12345)),
        (T.per_cpu("runqueues", 0, "scx.flags"), V.or_u32(32)),
        (T.per_cpu("runqueues", 1, "scx.clock"), V.u64(12345)),
        (T.per_cpu("runqueues", 1, "scx.flags"), V.or_u32(32)),
    ]
