"""Safe KVM objects: Kvm (/dev/kvm), Vm, Vcpu, GuestMemory, PVM detection."""

from vmm.kvm.kvm import (  # noqa: F401
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    Kvm,
    Vcpu,
    Vm,
)
from vmm.kvm.memory import GuestMemory  # noqa: F401
from vmm.kvm.pvm import is_pvm_host  # noqa: F401
