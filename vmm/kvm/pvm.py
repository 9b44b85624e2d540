"""Detects a PVM host (/dev/kvm backed by kvm_pvm instead of VMX/SVM).

There guest ring 0 is emulated and slow, and some instructions need user-space assists
(vmm/machine/pvm/ holds what it takes); real hosts take the plain path.
"""

import os

PVM_MODULE_PATH = "/sys/module/kvm_pvm"


def is_pvm_host(module_path: str = PVM_MODULE_PATH) -> bool:
    """True on a PVM host (the kvm_pvm module is loaded)."""
    return os.path.isdir(module_path)
