"""Safe KVM objects: Kvm (/dev/kvm), Vm, Vcpu, GuestMemory, PVM detection."""

# The MSRs a freeze snapshot reads (defined in vmm.arch.x86.regs), re-exported here.
from vmm.arch.x86.regs import MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR  # noqa: F401
from vmm.kvm.kvm import Kvm, Vcpu, Vm  # noqa: F401
from vmm.kvm.memory import GuestMemory  # noqa: F401
from vmm.kvm.pvm import is_pvm_host  # noqa: F401
