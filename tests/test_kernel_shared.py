"""vmm.kernel.shared: machines of one kernel in one process share its parsed Kernel,
and a changed file is parsed again."""

import os
import shutil
from pathlib import Path

import pytest

from vmm.kernel import shared

GUEST = Path(__file__).resolve().parents[1] / "kernels/guests/out/guest.elf"

pytestmark = pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests")


@pytest.fixture(autouse=True)
def empty():
    shared.forget()
    yield
    shared.forget()


def test_unchanged_file_is_parsed_once(tmp_path):
    f = tmp_path / "vmlinux"
    shutil.copy(GUEST, f)
    a = shared.load_shared(vmlinux=f)
    assert shared.load_shared(vmlinux=str(f)) is a
    assert a.symbol("runqueues")


def test_rewritten_or_replaced_file_is_parsed_again(tmp_path):
    f = tmp_path / "vmlinux"
    shutil.copy(GUEST, f)
    a = shared.load_shared(vmlinux=f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten in place
    b = shared.load_shared(vmlinux=f)
    assert b is not a
    g = tmp_path / "new"
    shutil.copy(GUEST, g)
    os.replace(g, f)  # replaced by a new file (another inode)
    assert shared.load_shared(vmlinux=f) is not b


def test_only_the_most_recent_are_kept(tmp_path):
    files = []
    for i in range(shared.KEEP + 1):
        files.append(tmp_path / f"vmlinux{i}")
        shutil.copy(GUEST, files[-1])
    first = shared.load_shared(vmlinux=files[0])
    for f in files[1:]:
        shared.load_shared(vmlinux=f)
    assert shared.load_shared(vmlinux=files[0]) is not first


def test_bytes_are_parsed_every_time():
    data = GUEST.read_bytes()
    assert shared.load_shared(vmlinux=data) is not shared.load_shared(vmlinux=data)
