"""x86-64: ``regs`` (CR/EFER/MSR/RFLAGS bits), ``paging`` (page walk, guest-virtual
access), ``decode`` (the instruction decoder of the PVM assists), ``layout`` (the
platform's 32-bit MMIO gap)."""
