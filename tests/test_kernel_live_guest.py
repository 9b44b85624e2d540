"""The live view against a real running guest on KVM: our test guests
(kernels/guests) in both per-CPU styles, frozen, read through GuestMemory."""

from pathlib import Path

import pytest

from guest_abi import require_guests
from vmm.kernel import Kernel

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "kernels" / "guests" / "out"
GUESTS = {"absolute": OUT / "guest.elf", "relative": OUT / "guest-percpu0.elf"}


@pytest.fixture(scope="module")
def guests():
    require_guests(*GUESTS.values())
    return GUESTS


@pytest.mark.parametrize("style", ["absolute", "relative"])
def test_frozen_guest_runqueues(guests, style, tmp_path, monkeypatch):
    from vmm.kvm import MSR_LSTAR
    from vmm.runtime import Machine

    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    k = Kernel.load(vmlinux=guests[style])
    assert k.percpu_style == style
    initial = k.enum("SCX_RQ_ONLINE") | k.enum("SCX_RQ_BAL_KEEP")
    with Machine(guests[style], cpus=2, cmdline="mode=loop cpus=2", timeout=60) as m:
        m.wait_for_console("2 cpus up", timeout=30)
        with m.freeze(timeout=10) as snap:
            v = snap.vcpus[0]
            live = k.attach(m.memory, cr3=v.cr3, lstar=v.msrs.get(MSR_LSTAR), cr4=v.sregs.cr4,
                            idt_base=v.sregs.idt.base)  # as vmm.session passes them
            assert live.slide == 0 and live.phys_base == 0
            assert live.possible_cpus() == [0, 1]
            for cpu in (0, 1):
                assert live.read("runqueues", "cpu", cpu=cpu) == cpu
                assert live.read("runqueues", "scx.nr_immed", cpu=cpu) == 0xA5A5A5A5
                assert live.read("runqueues", "scx.flags", cpu=cpu) & initial == initial
                kva = live.per_cpu_address("runqueues", cpu, "scx.flags")
                # The image-map shortcut and the guest's own page tables agree.
                from vmm.arch.x86.paging import walk

                assert walk(m.memory, v.cr3, kva) == live.kva_to_gpa(kva)
            assert live.read("init_uts_ns", "name.nodename", type="struct uts_namespace")[:9] == b"vmm-guest"
        m.stop()
