"""The KVM layer's state get/set (vmm.kvm.vcpu_state, vm_state) on our running test guest:
every piece is read, set back on the same vCPUs while frozen, and the guest goes on.
On PVM every ioctl answers (see README "Snapshots")."""

import time
from pathlib import Path

import pytest

from vmm import Machine
from vmm.kvm import vcpu_state, vm_state
from vmm.kvm.vcpu_state import MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
]


def counters(m, cpus):
    return [m.read("runqueues", "counter", cpu=c, hot=True) for c in range(cpus)]


def wait_advance(m, cpus, timeout=30.0):
    start = counters(m, cpus)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = counters(m, cpus)
        if all(b > a for a, b in zip(start, now)):
            return
        time.sleep(0.01)
    pytest.fail(f"the guest did not go on: {start} -> {now}")


@pytest.mark.parametrize("ring", [3, 0])
def test_state_round_trip_on_running_guest(started, ring):
    cpus = 2
    m = started(Machine(kernel=str(GUEST), cpus=cpus, cmdline=f"mode=loop cpus={cpus} ring={ring}"))
    m.wait_for_console(r"2 cpus up", timeout=120)
    indices = vcpu_state.msr_index_list(m.kvm)
    assert MSR_IA32_TSC in indices and MSR_KVM_SYSTEM_TIME_NEW in indices
    with m.freeze():
        vm = vm_state.capture(m.vm)
        states = [vcpu_state.capture(v, indices) for v in m.vcpus]
        assert all(not s.refused for s in states), [s.refused for s in states]
        assert vm_state.VmState.from_json(vm.to_json()) == vm
        states = [vcpu_state.VcpuState.from_json(s.to_json()) for s in states]
        vm_state.apply(m.vm, vm)
        for v, s in zip(m.vcpus, states):
            vcpu_state.apply(v, s)
        again = [vcpu_state.capture(v, indices) for v in m.vcpus]
        for a, b in zip(states, again):
            for piece in ("regs", "sregs", "xcrs", "lapic", "debugregs", "mp_state"):
                assert getattr(a, piece) == getattr(b, piece), (a.index, piece)
            # A fault in flight at the freeze reads back injected, not pending (KVM's ABI)
            assert vcpu_state.events_as_restored(a.events) == b.events, a.index
            assert a.msrs.keys() == b.msrs.keys()
    wait_advance(m, cpus)


def test_corrupt_state_is_refused():
    from vmm.errors import InvalidValue

    with pytest.raises(InvalidValue, match="lapic is 3 bytes"):
        vcpu_state.VcpuState(0, bytes(144), bytes(312), bytes(416), None, None, {}, 0,
                             b"abc", bytes(64), None).check_sizes()


def test_events_as_restored_folds_a_pending_fault_into_injected():
    # #GP (13) with an error code, raised but not yet delivered, no payload flag
    pending = bytes([1, 13, 1, 1]) + bytes(16) + (0x0D).to_bytes(4, "little") + bytes(40)
    assert vcpu_state.events_as_restored(pending)[:4] == bytes([1, 13, 1, 0])
    assert vcpu_state.events_as_restored(pending)[4:] == pending[4:]
    # with KVM_VCPUEVENT_VALID_PAYLOAD, pending and injected are kept apart
    payload = bytes([0, 14, 1, 1]) + bytes(16) + (0x10).to_bytes(4, "little") + bytes(40)
    assert vcpu_state.events_as_restored(payload) == payload
    quiet = bytes(64)
    assert vcpu_state.events_as_restored(quiet) == quiet
