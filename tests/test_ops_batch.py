"""The batch dispatcher against real guest RAM (an anonymous mapping; no VM needed).

Targets resolve through a small table resolver standing in for the kernel's symbol
and BTF lookups (those are tested in tests/test_btf*.py); what is under test here is
the seed's write semantics and the validate-everything-first rule.
"""

import threading

import pytest

from fake_resolver import CLOCK, FLAGS, MISALIGNED, NAME, NR_IMMED, Rendezvous, TableResolver
from vmm.errors import BatchError
from vmm.kvm.memory import GuestMemory
from vmm.ops import KernelTarget as T, KernelValue as V, Op, apply_op


@pytest.fixture
def mem():
    m = GuestMemory(0x10000)
    m.write_u32(FLAGS, 0b1001)  # ONLINE | BAL_KEEP
    m.write_u32(NR_IMMED, 0xA5A5A5A5)
    yield m
    m.close()


def run(op, mem, rv=None):
    return apply_op(op, mem, lambda snap: TableResolver(), rv or Rendezvous())


def test_cold_clock_then_or_flag_keeps_other_bits_and_neighbour(mem):
    rv = Rendezvous()
    res = run(Op.WriteKernelCold([
        (T.per_cpu("runqueues", 0, "scx.clock"), V.u64(0x123456789)),
        (T.per_cpu("runqueues", 0, "scx.flags"), V.or_u32(1 << 5)),
    ]), mem, rv)
    assert rv.count == 1  # one cold batch, one rendezvous
    assert mem.read_u64(CLOCK) == 0x123456789
    assert mem.read_u32(FLAGS) == 0b101001
    assert mem.read_u32(NR_IMMED) == 0xA5A5A5A5
    assert [str(e.after) for e in res.entries] == ["U64(0x123456789)", "U32(0x29)"]
    assert res.entries[1].before == V.u32(0b1001)


def test_hot_batch_takes_no_rendezvous(mem):
    rv = Rendezvous()
    run(Op.WriteKernelHot([(T.per_cpu("runqueues", 0, "scx.flags"), V.or_u32(1 << 7))]), mem, rv)
    assert rv.count == 0 and mem.read_u32(FLAGS) == 0b10001001


def test_width_mismatch_names_both_and_writes_nothing(mem):
    batch = [
        (T.per_cpu("runqueues", 0, "scx.clock"), V.u64(7)),       # fine
        (T.per_cpu("runqueues", 0, "scx.flags"), V.u64(1)),       # u64 into u32
    ]
    with pytest.raises(BatchError) as ei:
        run(Op.WriteKernelCold(batch), mem)
    assert ei.value.index == 1
    assert "U64 is 8 bytes" in str(ei.value) and "4 bytes" in str(ei.value) and "u32" in str(ei.value)
    assert mem.read_u64(CLOCK) == 0  # entry 0 was not written either


def test_unknown_symbol_fails_whole_batch(mem):
    with pytest.raises(BatchError) as ei:
        run(Op.WriteKernelCold([
            (T.per_cpu("runqueues", 0, "scx.clock"), V.u64(7)),
            (T.symbol("no_such_symbol"), V.u32(1)),
        ]), mem)
    assert ei.value.index == 1 and "no_such_symbol" in str(ei.value)
    assert mem.read_u64(CLOCK) == 0


def test_address_outside_ram_rejected_before_any_write(mem):
    with pytest.raises(BatchError) as ei:
        run(Op.WriteKernelCold([
            (T.gpa(CLOCK), V.u64(9)),
            (T.gpa(0x10000 - 2), V.u32(1)),  # straddles the end of RAM
        ]), mem)
    assert ei.value.index == 1 and mem.read_u64(CLOCK) == 0


def test_misaligned_hot_or_rejected(mem):
    with pytest.raises(BatchError, match="misaligned hot-path OrU32"):
        run(Op.WriteKernelHot([(T.gpa(0x1001), V.or_u32(1))]), mem)


def test_misaligned_cold_or_allowed_under_quiesce(mem):
    mem.write_u32(0x1101, 0x10)
    run(Op.WriteKernelCold([(T.gpa(0x1101), V.or_u32(1))]), mem)
    assert mem.read_u32(0x1101) == 0x11


def test_misaligned_u64_lands_whole(mem):
    run(Op.WriteKernelCold([(T.field("probe", "value"), V.u64(0x2222222222222222))]), mem)
    assert mem.read(MISALIGNED, 8) == b"\x22" * 8


def test_bytes_into_char_array(mem):
    run(Op.WriteKernelCold([(T.field("init_uts_ns", "name.nodename"), V.bytes(b"frozen\0"))]), mem)
    assert mem.read(NAME, 7) == b"frozen\0"
    with pytest.raises(BatchError, match="does not fit"):
        run(Op.WriteKernelCold([(T.field("init_uts_ns", "name.nodename"), V.bytes(b"x" * 66))]), mem)


def test_bitfield_refused(mem):
    with pytest.raises(BatchError, match="bitfield"):
        run(Op.WriteKernelCold([(T.field("packed", "bits"), V.u32(1))]), mem)


def test_order_is_preserved(mem):
    run(Op.WriteKernelCold([(T.gpa(0x5000), V.u32(1)), (T.gpa(0x5000), V.u32(2))]), mem)
    assert mem.read_u32(0x5000) == 2


def test_reads_have_result_shape(mem):
    res = run(Op.ReadKernelCold([
        T.per_cpu("runqueues", 0, "scx.flags"), T.per_cpu("runqueues", 0, "scx.clock"),
        T.field("init_uts_ns", "name.nodename")]), mem)
    assert res.values[0] == V.u32(0b1001) and res.values[1] == V.u64(0)
    assert res.values[2] == V.bytes(b"\0" * 65)
    with pytest.raises(BatchError, match="size is unknown"):
        run(Op.ReadKernelHot([T.gpa(0x10)]), mem)


def test_malformed_entries_rejected_at_construction():
    with pytest.raises(BatchError, match="not a KernelValue"):
        Op.WriteKernelCold([(T.gpa(0), 5)])
    with pytest.raises(BatchError, match="expected"):
        Op.WriteKernelCold([T.gpa(0)])


def test_mode_is_an_enum_equal_to_the_old_strings_and_old_names_still_work():
    from vmm.ops import COLD, HOT, FieldTarget, Mode, SymbolTarget
    from vmm.ops import targets

    cold, hot = Op.WriteKernelCold([]), Op.ReadKernelHot([])
    assert cold.mode is Mode.COLD == COLD == "cold" and hot.mode is Mode.HOT == HOT == "hot"
    assert f"{cold.mode}" == "cold" and Op("read", "hot", ()).mode is Mode.HOT
    with pytest.warns(DeprecationWarning, match="Op.mode"):
        assert cold.path is Mode.COLD
    assert targets.Symbol is SymbolTarget and targets.Field is FieldTarget
    assert T.Symbol is SymbolTarget and T.Field is FieldTarget
    assert isinstance(T.symbol("jiffies"), SymbolTarget) and isinstance(T.field("a", "b"), FieldTarget)


def test_hot_or_races_with_concurrent_atomic_writer(mem):
    """Host-side proof of 'no bit lost': a thread ORs low bits atomically while hot
    OrU32 batches set the high bits of the same word."""
    word = 0x6000

    def guest_like_writer():
        for bit in range(16):
            for _ in range(200):
                mem.fetch_or_u32(word, 0)  # contend on the line
            mem.fetch_or_u32(word, 1 << bit)

    t = threading.Thread(target=guest_like_writer)
    t.start()
    for bit in range(16, 32):
        run(Op.WriteKernelHot([(T.gpa(word), V.or_u32(1 << bit))]), mem)
    t.join()
    assert mem.read_u32(word) == 0xFFFFFFFF
