"""sched_ext's event counters in the monitor (vmm/kernel/scx_events.py, GuardedColumns of
vmm/runtime/monitor.py).

The layout against the real BTF of our Linux 7.3 build (skipped when it is not built):
``scx_root->pcpu->event_stats``, every ``SCX_EV_*`` an aligned s64. Then the monitor over
a sparse fake memory laid out at those offsets: no columns' values while no scheduler is
attached, the counters once one is, relocated when another replaces it, None when
``scx_root`` changes between the loads. A kernel without them (our test guest) gets no
columns and the reason in ``skipped`` (the real-KVM check of that is in test_monitor.py's
boot of the test guest).
"""

import glob
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from kfixture import FakeLive  # noqa: E402

from vmm.errors import KernelFeatureMissing  # noqa: E402
from vmm.kernel.scx_events import (EVENTS_KEY, EventLayout, plan_scx_event_columns,  # noqa: E402
                                   plan_scx_events)
from vmm.runtime.monitor import Monitor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "kernels/guests/out/guest.elf"
SCH = 0xFFFF888000100000
SCH2 = 0xFFFF888000110000
PCPU = 0x0000000000030000           # a __percpu pointer: an offset from each CPU's base
PCPU2 = 0x0000000000034000
OFFSETS = [0xFFFF888010000000, 0xFFFF888010200000]   # __per_cpu_offset[0..1]


@pytest.fixture(scope="module")
def k73():
    from vmm.kernel import Kernel
    found = sorted(glob.glob(str(Path.home() / ".cache/vmm/kernels/build/7.3-*/vmlinux")))
    if not found:
        pytest.skip("Linux 7.3 is not built (~/.cache/vmm/kernels/build/7.3-*/vmlinux): "
                    "make kernel-build; the event counters' layout is checked against its BTF")
    return Kernel.load(vmlinux=found[0])


class Live(FakeLive):
    """FakeLive plus what the event plan needs: per-CPU offsets and an identity
    translation (gpa == kva in the sparse memory)."""

    def per_cpu_offsets(self):
        return list(OFFSETS)

    def kva_to_gpa(self, kva):
        return kva


class Mem:
    """The monitor's GuestMemory stand-in over the same sparse memory; ``on_u64(gpa)``
    runs before each 8-byte load."""

    def __init__(self, live):
        self.live, self.on_u64 = live, None

    def read_u64(self, gpa):
        if self.on_u64 is not None:
            self.on_u64(gpa)
        return int.from_bytes(self.live.mem.read(gpa, 8), "little")

    def read_u32(self, gpa):
        return int.from_bytes(self.live.mem.read(gpa, 4), "little")

    read_u8 = read_u16 = read_u32


def test_layout_of_73(k73):
    lay = EventLayout.of(k73)
    btf = k73.btf
    assert lay.via == "pcpu" and lay.ptr_off == btf.offsetof("struct scx_sched", "pcpu")
    assert lay.stats_off == btf.offsetof("struct scx_sched_pcpu", "event_stats")
    assert "SCX_EV_SELECT_CPU_FALLBACK" in lay.names and "SCX_EV_BYPASS_DURATION" in lay.names
    assert all(n.startswith("SCX_EV_") for n in lay.names) and not lay.skipped
    for name, off in zip(lay.names, lay.offsets):
        assert off == btf.offsetof("struct scx_event_stats", name) and off % 8 == 0


def put_counters(live, lay, pcpu, base_value):
    for cpu, off in enumerate(OFFSETS):
        for i, o in enumerate(lay.offsets):
            live.u64(pcpu + off + lay.stats_off + o, base_value + 100 * cpu + i)


def test_the_monitor_follows_the_attached_scheduler(k73):
    live = Live(k73)
    lay = EventLayout.of(k73)
    root = live.symbol_address("scx_root")
    live.u64(root, 0)
    for sch, pcpu in ((SCH, PCPU), (SCH2, PCPU2)):
        live.put(sch, bytes(lay.ptr_off + 8))
        live.u64(sch + lay.ptr_off, pcpu)
    put_counters(live, lay, PCPU, 1000)
    put_counters(live, lay, PCPU2, 5000)
    mem = Mem(live)
    guarded, skipped = plan_scx_event_columns(live, [0, 1], {"x": "y"})
    assert skipped == {"x": "y"} and guarded.fields == lay.names and guarded.guard_gpa == root
    mon = Monitor(mem, [0, 1], [], [], interval=0.01, guarded=guarded)
    assert mon.fields == lay.names and mon.fixed_fields == ()
    first = lay.names[0]

    s = mon.sample()                                   # no scheduler attached
    assert s.rows[0][first] is None and mon.relocations == 0
    live.u64(root, SCH)                                # attached: its counters
    s = mon.sample()
    assert [s.rows[c][first] for c in (0, 1)] == [1000, 1100]
    assert s.rows[1][lay.names[-1]] == 1100 + len(lay.names) - 1
    assert mon.relocations == 1
    mon.sample()
    assert mon.relocations == 1                        # located once per scheduler
    live.u64(root, SCH2)                               # another scheduler replaced it
    assert mon.sample().rows[0][first] == 5000 and mon.relocations == 2

    def detach_midway(gpa):                            # scx_root changes between the loads
        if gpa != root:
            live.u64(root, SCH)
    mem.on_u64 = detach_midway
    assert mon.sample().rows[0][first] is None
    mem.on_u64 = None
    live.u64(SCH + lay.ptr_off, 0)                     # a scheduler without its per-CPU data
    live.u64(root, SCH2)
    mon.sample()
    live.u64(root, SCH)
    assert mon.sample().rows[0][first] is None and "no per-CPU data" in mon.guard_error
    assert mon.as_dict()["guarded_fields"] == list(lay.names)


def test_a_kernel_without_event_counters_gets_no_columns():
    from vmm.kernel import Kernel
    if not GUEST.exists():
        pytest.skip("the test guest is not built: make guests")
    kern = Kernel.load(vmlinux=GUEST)
    with pytest.raises(KernelFeatureMissing, match="scx_event_stats"):
        EventLayout.of(kern)
    guarded, skipped = plan_scx_event_columns(FakeLive(kern), [0], {})
    assert guarded is None and "no sched_ext event counters" in skipped[EVENTS_KEY]
    with pytest.raises(KernelFeatureMissing):
        plan_scx_events(FakeLive(kern), [0])


def test_wider_rows_keep_fewer_samples_by_default():
    """The default bound is in row-fields: 16 event columns beside 5 run-queue fields
    keep about a quarter of the samples (memory stays near the same bound)."""
    from vmm.runtime.monitor import MAX_ROWS, GuardedColumns

    class Zero:
        def read_u64(self, gpa):
            return 0
        read_u8 = read_u16 = read_u32 = read_u64

    five = ["a", "b", "c", "d", "e"]
    plain = Monitor(Zero(), [0, 1], five, [(r, 8 * i, 8) for r in (0, 1) for i in range(5)])
    ev = GuardedColumns(tuple(f"SCX_EV_{i}" for i in range(16)), 0x100, lambda v: [])
    wide = Monitor(Zero(), [0, 1], five, [(r, 8 * i, 8) for r in (0, 1) for i in range(5)],
                   guarded=ev)
    assert plain.samples.maxlen == MAX_ROWS // 2
    assert wide.samples.maxlen == int(MAX_ROWS // (2 * 21 / 5))
