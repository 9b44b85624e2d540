"""Architecture facts below every other layer of vmm (only vmm.errors is lower).

``vmm.arch.x86``: register bits and MSR numbers, the page walk and guest-virtual
memory access, the instruction decoding the PVM assists need, and the platform's
memory-map constants. Plain Python on plain data: no KVM, no machine, no kernel.
"""
