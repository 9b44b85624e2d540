"""Cold batches resolved before the freeze (vmm/ops/resolve.py, vmm/ops/plan.py), on
our test guest with 1024 possible CPUs (`possible=1024`: CPUs 0-1 run, their per-CPU
areas are in the image; CPUs 2-1023 only exist, their areas are in the direct map)."""

from contextlib import contextmanager
from pathlib import Path

import pytest

from guest_abi import require_guests
from vmm import KernelTarget as T, KernelValue as V, Machine, Op
from vmm.errors import BatchError
from vmm.kernel.translate import START_KERNEL_MAP
from vmm.ops.batch import apply_op
from vmm.ops.resolve import LiveResolver, StagedResolver
from vmm.ops.values import U32, U64

GUEST = Path(__file__).resolve().parents[1] / "kernels" / "guests" / "out" / "guest.elf"
POSSIBLE = 1024
MASK64 = (1 << 64) - 1
DIRECT_MAP = 0xFFFF888000000000


@pytest.fixture(scope="module")
def m():
    require_guests(GUEST)
    machine = Machine(kernel=str(GUEST), cpus=2, memory="256M", console=None,
                      cmdline=f"mode=loop cpus=2 possible={POSSIBLE}")
    machine.start()
    try:
        machine.wait_for_console("2 cpus up", timeout=120)
        assert machine.possible_cpus() == list(range(POSSIBLE))  # also a freeze to stage from
        yield machine
    finally:
        machine.stop()


def mission(cpus, mask, clock):
    batch = []
    for cpu in cpus:
        batch += [(T.per_cpu("runqueues", cpu, "scx.clock"), V.u64(clock + cpu)),
                  (T.per_cpu("runqueues", cpu, "scx.flags"), V.or_u32(mask))]
    return batch


def test_clock_then_flag_order_kept_and_seen_by_the_guest(m):
    # First in the file: the flag is still clear on the running CPUs (initial 0x9).
    mask = m.kernel_image.enum("SCX_RQ_CLK_VALID")
    clock = 0x5EED_0000_0000
    batch = mission(range(POSSIBLE), mask, clock)
    result = m.apply(Op.WriteKernelCold(batch))
    assert result.staged and not result.restaged
    assert [e.target for e in result.entries] == [t for t, _ in batch]
    for cpu in (0, 1, 2, 1023):
        clock_e, flags_e = result.entries[2 * cpu], result.entries[2 * cpu + 1]
        assert clock_e.after == U64(clock + cpu)
        assert flags_e.after == U32(flags_e.before.value | mask)
    # The running CPUs saw the flag rise with the clock already written: clock, then flag.
    import time

    deadline = time.monotonic() + 60
    for cpu in (0, 1):
        while m.read("runqueues", "obs_events", cpu=cpu, hot=True) < 1:
            assert time.monotonic() < deadline, f"cpu {cpu} never saw SCX_RQ_CLK_VALID"
            time.sleep(0.01)
        assert m.read("runqueues", "obs_clock", cpu=cpu) == clock + cpu
        assert m.read("runqueues", "obs_inconsistent", cpu=cpu) == 0
        assert m.read("runqueues", "scx.nr_immed", cpu=cpu) == 0xA5A5A5A5
    assert m.read("runqueues", "scx.clock", cpu=1023) == clock + 1023


def test_entries_apply_in_batch_order_on_one_target(m):
    t_clock = T.per_cpu("runqueues", 700, "scx.clock")
    t_flags = T.per_cpu("runqueues", 700, "scx.flags")
    result = m.apply(Op.WriteKernelCold([
        (t_clock, V.u64(1)), (t_flags, V.u32(0x9)), (t_clock, V.u64(2)),
        (t_flags, V.or_u32(0x20)), (t_flags, V.or_u32(0x40))]))
    befores = [e.before for e in result.entries]
    assert befores[2] == U64(1) and befores[3] == U32(0x9) and befores[4] == U32(0x29)
    assert m.read(t_clock) == 2 and m.read(t_flags) == 0x69


def test_per_cpu_target_staged_equals_resolved_in_the_freeze(m):
    staged = LiveResolver(m.live()).staged()
    paths = ("scx.clock", "scx.flags", "cpu")
    ahead = {(cpu, p): T.per_cpu("runqueues", cpu, p).resolve(staged)
             for cpu in (0, 1, 2, 511, 1023) for p in paths}
    staged.seal()
    with m.freeze() as snap:
        inner = LiveResolver(m.live(snap))
        for (cpu, p), loc in ahead.items():
            assert loc == T.per_cpu("runqueues", cpu, p).resolve(inner)
            assert loc.gpa is not None  # image or direct map: nothing left to the freeze
        assert staged.still_valid(inner)
    assert ahead[(0, "cpu")].kva >= START_KERNEL_MAP  # running CPU: image map
    assert DIRECT_MAP <= ahead[(1023, "cpu")].kva < START_KERNEL_MAP  # possible-only: direct map
    # What staging read and the freeze re-checks: nr_cpu_ids and __per_cpu_offset[]
    # (read whole, once), nothing else.
    k = m.kernel_image
    assert sorted((gpa, len(data)) for gpa, data in staged.guards) == sorted([
        (k.symbol("nr_cpu_ids") - START_KERNEL_MAP, 4),
        (k.symbol("__per_cpu_offset") - START_KERNEL_MAP, 8 * POSSIBLE)])


@contextmanager
def per_cpu_offset_aliased(m, cpu):
    """Point __per_cpu_offset[cpu] at the guest's identity map of the same RAM: that
    CPU's runqueues then has a kva outside the image and direct maps (a page walk, like
    a vmalloc'd per-CPU chunk), and the guest itself still reads the same memory."""
    k = m.kernel_image
    slot = k.symbol("__per_cpu_offset") - START_KERNEL_MAP + 8 * cpu  # image map, phys_base 0
    rq = k.symbol("runqueues")
    with m.freeze():
        real = m.memory.read_u64(slot)
        rq_gpa = ((rq + real) & MASK64) - START_KERNEL_MAP
        m.memory.write_u64(slot, (rq_gpa - rq) & MASK64)  # runqueues + offset == rq_gpa
    try:
        yield rq_gpa
    finally:
        with m.freeze():
            m.memory.write_u64(slot, real)


def test_page_walked_per_cpu_target_resolves_inside_the_freeze(m):
    off = m.kernel_image.btf.offsetof("struct rq", "scx.clock")
    with per_cpu_offset_aliased(m, 1) as rq_gpa:
        staged = LiveResolver(m.live()).staged()
        loc = T.per_cpu("runqueues", 1, "scx.clock").resolve(staged)
        assert loc.gpa is None and loc.kva == rq_gpa + off  # left to the freeze's page walk
        result = m.apply(Op.WriteKernelCold([
            (T.per_cpu("runqueues", 0, "scx.clock"), V.u64(0xC0)),
            (T.per_cpu("runqueues", 1, "scx.clock"), V.u64(0xC1))]))
        assert result.staged and not result.restaged
        e = result.entries[1]
        assert e.location.kva == rq_gpa + off and e.location.gpa == rq_gpa + off
        assert m.memory.read_u64(rq_gpa + off) == 0xC1


def test_staging_assumption_changed_before_the_freeze_is_redone_inside(m):
    off = m.kernel_image.btf.offsetof("struct rq", "scx.clock")
    k = m.kernel_image
    slot = k.symbol("__per_cpu_offset") - START_KERNEL_MAP + 8 * 1
    with m.freeze():
        real = m.memory.read_u64(slot)
    rq_gpa = ((k.symbol("runqueues") + real) & MASK64) - START_KERNEL_MAP

    @contextmanager
    def freeze_after_moving_cpu1():
        with m.freeze() as snap:
            # Between staging and the freeze, __per_cpu_offset[1] changes (it never
            # does in Linux after boot: this is the check that says so).
            m.memory.write_u64(slot, (rq_gpa - k.symbol("runqueues")) & MASK64)
            yield snap

    try:
        op = Op.WriteKernelCold([(T.per_cpu("runqueues", 1, "scx.clock"), V.u64(0xD1))])
        result = apply_op(op, m.memory, lambda snap: LiveResolver(m.live(snap)),
                          freeze_after_moving_cpu1)
        assert result.restaged and not result.staged
        assert result.entries[0].location.kva == rq_gpa + off  # the moved address, walked
        assert m.memory.read_u64(rq_gpa + off) == 0xD1
    finally:
        with m.freeze():
            m.memory.write_u64(slot, real)


def _clocks(m):
    return m.apply(Op.ReadKernelCold([T.per_cpu("runqueues", c, "scx.clock")
                                      for c in range(POSSIBLE)])).values


def test_bad_last_entry_of_2048_refused_before_the_freeze(m):
    mask = m.kernel_image.enum("SCX_RQ_CLK_VALID")
    batch = mission(range(POSSIBLE), mask, 0xBAD0_0000)
    batch[2047] = (T.per_cpu("runqueues", 1023, "scx.flags"), V.u64(1))  # u32 field
    before = _clocks(m)
    generation = m.coordinator.generation
    with pytest.raises(BatchError) as ei:
        m.apply(Op.WriteKernelCold(batch))
    assert ei.value.index == 2047 and "U64 is 8 bytes" in str(ei.value)
    assert m.coordinator.generation == generation  # no vCPU was even parked
    assert _clocks(m) == before


def test_bad_last_entry_found_inside_the_freeze_writes_nothing(m):
    mask = m.kernel_image.enum("SCX_RQ_CLK_VALID")
    batch = mission(range(POSSIBLE), mask, 0xBAD1_0000)
    batch[2047] = (T.kva(0x0000_0080_0000_0000, 4), V.u32(1))  # unmapped: known by walking
    before = _clocks(m)
    with pytest.raises(BatchError) as ei:
        m.apply(Op.WriteKernelCold(batch))
    assert ei.value.index == 2047 and "not mapped" in str(ei.value)
    assert _clocks(m) == before


def test_staged_resolver_never_walks(m):
    staged = LiveResolver(m.live()).staged()
    assert isinstance(staged, StagedResolver) and staged.live.cr3 is None
    assert T.kva(0x1000000, 8).resolve(staged).gpa is None  # identity map: walked frozen
    assert T.kva(START_KERNEL_MAP + 0x1000000, 8).resolve(staged).gpa == 0x1000000


def test_plan_in_c_and_entry_by_entry_in_python_agree(monkeypatch):
    """No KVM needed: the same cold batches through the C plan and the Python fallback."""
    from fake_resolver import CLOCK, FLAGS, NAME, NR_IMMED, Rendezvous, TableResolver
    from vmm.kvm.memory import GuestMemory
    from vmm.ops import plan

    batch = [(T.per_cpu("runqueues", 0, "scx.clock"), V.u64(7)),
             (T.per_cpu("runqueues", 0, "scx.flags"), V.or_u32(0x20)),
             (T.field("init_uts_ns", "name.nodename"), V.bytes(b"frozen\0")),
             (T.gpa(0x2001), V.u64(0x1111111111111111)),
             (T.per_cpu("runqueues", 0, "scx.flags"), V.u32(0x9))]
    reads = [T.per_cpu("runqueues", 0, "scx.clock"), T.per_cpu("runqueues", 0, "scx.nr_immed"),
             T.field("init_uts_ns", "name.nodename"), T.gpa(0x2001, 2)]
    outcomes = []
    for native in (True, False):
        monkeypatch.setattr(plan, "USE_NATIVE", native)
        with GuestMemory(0x10000) as mem:
            mem.write_u32(FLAGS, 0b1001)
            mem.write_u32(NR_IMMED, 0xA5A5A5A5)
            w = apply_op(Op.WriteKernelCold(batch), mem, lambda s: TableResolver(), Rendezvous())
            r = apply_op(Op.ReadKernelCold(reads), mem, lambda s: TableResolver(), Rendezvous())
            outcomes.append(([(e.location, e.before, e.after) for e in w.entries], r.values,
                             mem.read(0, 0x4000)))
            assert mem.read_u64(CLOCK) == 7 and mem.read(NAME, 7) == b"frozen\0"
    assert outcomes[0] == outcomes[1]
