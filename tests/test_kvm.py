"""The KVM object wrappers (vmm.kvm.kvm, vmm.kvm.pvm) against the real /dev/kvm."""

from __future__ import annotations

import errno
import os

import pytest

from vmm.errors import CapabilityMissing, KvmIoctlError, KvmPermissionError, KvmUnavailable
from vmm.kvm import MSR_KERNEL_GS_BASE, GuestMemory, Kvm, is_pvm_host

needs_kvm = pytest.mark.kvm


def fd_count():
    return len(os.listdir("/proc/self/fd"))


# -- opening /dev/kvm (path parameter: the error branches without mocking KVM) ---------
def test_missing_device_says_what_to_do(tmp_path):
    with pytest.raises(KvmUnavailable, match="does not exist.*modprobe"):
        Kvm(str(tmp_path / "kvm"))


def test_permission_denied_says_what_to_do():
    path = "/sys/kernel/notes"  # refuses O_RDWR with EACCES, even for root
    try:
        os.close(os.open(path, os.O_RDWR))
        pytest.skip(f"{path} opens read-write here: no EACCES path to test")
    except PermissionError:
        pass
    except OSError as e:
        pytest.skip(f"{path}: {e}")
    with pytest.raises(KvmPermissionError, match="permission denied.*kvm"):
        Kvm(path)


def test_not_a_kvm_device_names_the_ioctl():
    before = fd_count()
    with pytest.raises(KvmIoctlError) as e:
        Kvm("/dev/null")
    assert e.value.ioctl == "KVM_GET_API_VERSION" and e.value.errno == errno.ENOTTY
    assert "KVM_GET_API_VERSION" in str(e.value)
    assert fd_count() == before  # the fd was closed on the error path


# -- capabilities --------------------------------------------------------------------
@needs_kvm
def test_api_version_and_capabilities():
    with Kvm() as kvm:
        assert kvm.api_version == 12
        assert kvm.vcpu_mmap_size >= 4096
        for cap in ("KVM_CAP_IRQCHIP", "PIT2", "IMMEDIATE_EXIT", "USER_MEMORY", "SET_TSS_ADDR",
                    "MP_STATE", "VCPU_EVENTS", "ADJUST_CLOCK"):
            assert kvm.require(cap) > 0
        assert kvm.require("MAX_VCPUS") >= 8
        assert kvm.check_extension(99999) == 0


@needs_kvm
def test_missing_and_unknown_capabilities_are_named():
    with Kvm() as kvm:
        with pytest.raises(CapabilityMissing, match="KVM capability 99999"):
            kvm.require(99999)
        with pytest.raises(CapabilityMissing, match="KVM_CAP_NO_SUCH_THING"):
            kvm.require("KVM_CAP_NO_SUCH_THING")


@needs_kvm
def test_supported_cpuid():
    with Kvm() as kvm:
        cpuid = kvm.supported_cpuid()
        assert 0 < cpuid.nent <= 256
        assert any(cpuid.entries[i].function == 0 for i in range(cpuid.nent))


# -- VM and vCPU ioctls ----------------------------------------------------------------
@needs_kvm
def test_vm_and_vcpu_state_round_trips():
    with Kvm() as kvm, kvm.create_vm() as vm, GuestMemory(1 << 20) as mem:
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        vm.create_irqchip()
        vm.create_pit2()
        mem.register(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.supported_cpuid())
        r = vcpu.get_regs()
        r.rax, r.rip = 0x1234, 0x1000
        vcpu.set_regs(r)
        assert vcpu.get_regs().rax == 0x1234 and vcpu.get_regs().rip == 0x1000
        s = vcpu.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        vcpu.set_sregs(s)
        assert vcpu.get_sregs().cs.base == 0
        vcpu.set_msrs({MSR_KERNEL_GS_BASE: 0xFFFF888000001000})
        assert vcpu.get_msrs([MSR_KERNEL_GS_BASE]) == {MSR_KERNEL_GS_BASE: 0xFFFF888000001000}
        f = vcpu.get_fpu()
        f.mxcsr = 0x1F80
        vcpu.set_fpu(f)
        ev = vcpu.get_vcpu_events()
        vcpu.set_vcpu_events(ev)
        assert vcpu.get_mp_state() in (0, 1, 2, 3, 4)
        assert isinstance(vcpu.kvmclock_ctrl(), bool)
        clock, _ = vm.get_clock()
        vm.set_clock(clock + 1_000_000)
        assert vm.get_clock()[0] >= clock + 1_000_000
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)
        assert vcpu.run.immediate_exit == 0


@needs_kvm
def test_failing_vm_ioctls_name_the_ioctl():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmIoctlError, match="KVM_CREATE_VCPU.*vCPU 0") as e:
            vm.create_vcpu(0)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(KvmIoctlError, match="KVM_SET_USER_MEMORY_REGION"):
            vm.set_user_memory_region(0, 0x1001, 0x1000, 0x1000)  # unaligned


@needs_kvm
def test_unreadable_msr_is_named():
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(KvmIoctlError, match="MSR 0xdeadbeef"):
            vcpu.get_msrs([0xDEADBEEF])


@needs_kvm
def test_no_fd_leak_over_many_vms():
    before = fd_count()
    for _ in range(20):
        with Kvm() as kvm, kvm.create_vm() as vm:
            for i in range(4):
                vm.create_vcpu(i)
    assert fd_count() == before


def test_pvm_detection_follows_module_path(tmp_path):
    assert is_pvm_host(str(tmp_path)) is True
    assert is_pvm_host(str(tmp_path / "absent")) is False
    assert is_pvm_host() == os.path.isdir("/sys/module/kvm_pvm")
