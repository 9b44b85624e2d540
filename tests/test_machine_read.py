"""Machine.read decodes a value the way vmm.kernel.live does, from its BTF type:
small integers and bools are ints, signed fields are signed, bitfields are their bits."""

from pathlib import Path

import pytest

from vmm import KernelValue as V, Machine
from vmm.kernel.btf import Field

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
]


@pytest.fixture(scope="module")
def m():
    with Machine(kernel=str(GUEST), cpus=2, cmdline="mode=loop cpus=2") as machine:
        machine.wait_for_console("2 cpus up", timeout=60)
        yield machine


def test_small_int_and_bool_are_ints(m):
    v = m.read("runqueues", "scx.cpu_released", cpu=0)      # bool, 1 byte
    assert v == 0 and isinstance(v, int)
    with m.freeze() as snap:
        assert v == m.live(snap).read("runqueues", "scx.cpu_released", cpu=0)


def test_signed_field_reads_signed(m):
    m.write("runqueues", V.u32(0xFFFFFFFE), path="online", cpu=1)   # int online = -2
    assert m.read("runqueues", "online", cpu=1) == -2
    assert m.read("runqueues", "online", cpu=1, hot=True) == -2
    with m.freeze() as snap:
        assert m.live(snap).read("runqueues", "online", cpu=1) == -2
    m.write("runqueues", V.u32(1), path="online", cpu=1)


def test_unsigned_and_aggregates_unchanged(m):
    assert m.read("nr_cpu_ids") == 2
    assert m.read("runqueues", "scx.flags", cpu=0) & 0x9 == 0x9
    assert m.read("init_uts_ns", "name.nodename")[:10] == b"vmm-guest\0"
    assert isinstance(m.read("runqueues", cpu=0), bytes)


def test_bitfield_decodes_to_its_bits(m, monkeypatch):
    """A bitfield target (the test guest has none in its BTF: present one through the
    live view) reads as its bits, sign-extended per its type, not the storage unit."""
    from vmm.kernel.live import LiveKernel

    m.write("runqueues", V.u32(0b1100), path="online", cpu=0)   # bits 1..3 = 0b110 = -2
    btf = m.kernel_image.btf
    int_t = btf.type("int")
    real = LiveKernel.resolve

    def resolve(self, name, path=None, cpu=None, type=None):
        kva, f = real(self, name, path, cpu, type)
        if path == "online":  # bits 1..3 of the int: 3-bit signed field
            f = Field(f.offset, f.size, int_t, bit_offset=1, bit_size=3)
        return kva, f

    monkeypatch.setattr(LiveKernel, "resolve", resolve)
    assert m.read("runqueues", "online", cpu=0) == -2
    monkeypatch.undo()
    m.write("runqueues", V.u32(1), path="online", cpu=0)


def test_kernel_image_is_the_kernel_and_vmlinux_its_deprecated_name(m):
    from vmm.kernel import Kernel

    assert isinstance(m.kernel_image, Kernel)
    with pytest.warns(DeprecationWarning, match="kernel_image"):
        assert m.vmlinux is m.kernel_image
