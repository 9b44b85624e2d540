"""The VM-wide KVM state a snapshot needs: the in-kernel irqchip (PIC master, PIC slave,
IOAPIC), the PIT and the kvm-clock.

The irqchip and PIT structures are raw buffers of their <linux/kvm.h> sizes (the C core's
cdef lacks them), passed through the core's generic ioctl like vcpu_state's.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.errors import InvalidValue
from vmm.kvm.vcpu_state import _raw_ioctl, ioc

IRQCHIP_SIZE = 520  # u32 chip_id, pad; union { char dummy[512]; pic; ioapic; }
PIT_STATE2_SIZE = 112  # struct kvm_pit_channel_state channels[3] (24 each); u32 flags, reserved[9]
KVM_GET_IRQCHIP = ioc(3, 0x62, IRQCHIP_SIZE)
KVM_SET_IRQCHIP = ioc(2, 0x63, IRQCHIP_SIZE)  # _IOR in <linux/kvm.h>, as it is
KVM_GET_PIT2 = ioc(2, 0x9F, PIT_STATE2_SIZE)
KVM_SET_PIT2 = ioc(1, 0xA0, PIT_STATE2_SIZE)
IRQCHIP_IDS = (0, 1, 2)  # KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC


@dataclass
class VmState:
    """The irqchips (by chip id), the PIT and the kvm-clock (ns) of one VM."""

    irqchips: dict[int, bytes]
    pit: bytes
    clock: int

    def to_json(self) -> dict:
        """A JSON-able dict (bytes as hex)."""
        return {"irqchips": {str(k): v.hex() for k, v in self.irqchips.items()},
                "pit": self.pit.hex(), "clock": self.clock}

    @classmethod
    def from_json(cls, d: dict) -> "VmState":
        """The inverse of to_json; InvalidValue when a piece is missing or mis-sized."""
        try:
            state = cls({int(k): bytes.fromhex(v) for k, v in d["irqchips"].items()},
                        bytes.fromhex(d["pit"]), int(d["clock"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidValue(f"VM state: {type(e).__name__}: {e}") from None
        if sorted(state.irqchips) != list(IRQCHIP_IDS) or any(
                len(v) != IRQCHIP_SIZE for v in state.irqchips.values()) \
                or len(state.pit) != PIT_STATE2_SIZE:
            raise InvalidValue("VM state: the irqchip or PIT state has the wrong shape: the "
                               "snapshot is corrupt or from another build")
        return state


def capture(vm) -> VmState:
    """The irqchips, PIT and clock of `vm` (its vCPUs parked or not started)."""
    chips = {}
    for chip in IRQCHIP_IDS:
        buf = bytearray(IRQCHIP_SIZE)
        buf[0:4] = chip.to_bytes(4, "little")
        _raw_ioctl(vm.fd, KVM_GET_IRQCHIP, buf, "KVM_GET_IRQCHIP", f"chip {chip}")
        chips[chip] = bytes(buf)
    pit = bytearray(PIT_STATE2_SIZE)
    _raw_ioctl(vm.fd, KVM_GET_PIT2, pit, "KVM_GET_PIT2", "")
    clock, _ = vm.get_clock()
    return VmState(chips, bytes(pit), clock)


def apply(vm, state: VmState, clock: bool = True) -> None:
    """Sets the irqchips and PIT (made already: KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2) and,
    with `clock`, the kvm-clock, so the guest's clock goes on from where it was."""
    for chip in IRQCHIP_IDS:
        _raw_ioctl(vm.fd, KVM_SET_IRQCHIP, bytearray(state.irqchips[chip]),
                   "KVM_SET_IRQCHIP", f"chip {chip}")
    _raw_ioctl(vm.fd, KVM_SET_PIT2, bytearray(state.pit), "KVM_SET_PIT2", "")
    if clock:
        vm.set_clock(state.clock)
