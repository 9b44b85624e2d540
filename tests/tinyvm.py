"""Tiny hand-assembled guests for the KVM/runtime/freeze tests, and the VM that runs them.

Each guest is a few bytes of machine code placed at GUEST_CODE in a small VM with the
in-kernel irqchip. Real-mode code is emulated instruction by instruction on PVM hosts
(~2 M instr/s), so the loops are a handful of instructions. The ring-3 guest runs in
64-bit user mode, natively even on PVM.
"""

from __future__ import annotations

import threading

GUEST_CODE = 0x1000
COUNTERS = 0x2000  # one u64 per vCPU, 64 bytes apart
PML4 = 0x10000  # ring-3 guest page tables: PML4, PDPT, PD (one 2 MiB user page)
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

# 16-bit real mode (assembled with GNU as, .code16, linked at 0x1000):
HELLO = bytes.fromhex(  # print "hello\n" on COM1 with out 0x3f8, then out 0x2a to 0xf4, hlt
    "baf803be1510ac84c07403eeebf8baf400b02aeef468656c6c6f0a00")
COUNT = bytes.fromhex("66ff07ebfb")  # 1: incl (%bx); jmp 1b
COUNT_OUT = bytes.fromhex("66ff07eeebfa")  # 1: incl (%bx); out %al,(%dx); jmp 1b
CLI_HLT = bytes.fromhex("faf4ebfc")  # 1: cli; hlt; jmp 1b
OUT_LOOP = bytes.fromhex("eeebfd")  # 1: out %al,(%dx); jmp 1b
# 64-bit, run at CPL3:
USER_COUNT = bytes.fromhex("48ff03ebfb")  # 1: incq (%rbx); jmp 1b


def counter_gpa(i: int) -> int:
    return COUNTERS + 64 * i


class RecordingHandler:
    """Exit handler that records port writes and stops; optional hooks per port."""

    def __init__(self):
        self.outs: list[tuple[int, int, int, int]] = []
        self.stops: dict[int, tuple[str, str]] = {}
        self.stopped = threading.Event()
        self.out_hook = None  # callable(vcpu_index, port, size, value)
        self.nstops_expected = 1

    def io_in(self, i, port, size):
        return (1 << (8 * size)) - 1

    def io_out(self, i, port, size, value):
        self.outs.append((i, port, size, value))
        if self.out_hook:
            self.out_hook(i, port, size, value)

    def mmio_read(self, i, addr, size):
        return 0

    def mmio_write(self, i, addr, size, value):
        pass

    def on_internal_error(self, vcpu):
        return False

    def on_stop(self, i, reason, detail):
        self.stops[i] = (reason, detail)
        if len(self.stops) >= self.nstops_expected:
            self.stopped.set()


class TinyVm:
    """A VM with `ncpus` vCPUs all running `code` (real mode, or ring 3 with user=True)."""

    def __init__(self, code: bytes, ncpus: int = 1, user: bool = False, mem_size: int = 2 << 20,
                 port: int = 0x80, irqchip: bool = True):
        from vmm.kvm import GuestMemory, Kvm

        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        if irqchip:
            self.vm.create_irqchip()
        self.mem = GuestMemory(mem_size)
        self.mem.register(self.vm)
        self.mem.write(GUEST_CODE, code)
        if user:
            self._user_page_tables()
        self.vcpus = []
        self.threads = []
        for i in range(ncpus):
            v = self.vm.create_vcpu(i)
            if user:
                self._setup_user(v, i)
            else:
                self._setup_real(v, i, port)
            if i > 0 and irqchip:
                from vmm.kvm.native import native

                v.set_mp_state(native()[1].KVM_MP_STATE_RUNNABLE)  # APs would wait for SIPI
            self.vcpus.append(v)

    def _setup_real(self, v, i, port):
        s = v.get_sregs()
        for seg in (s.cs, s.ds, s.es, s.ss, s.fs, s.gs):
            seg.base, seg.selector = 0, 0
        v.set_sregs(s)
        r = v.get_regs()
        r.rip, r.rflags = GUEST_CODE, 0x2
        r.rbx, r.rdx, r.rsp = counter_gpa(i), port, 0x8000
        v.set_regs(r)

    def _user_page_tables(self):
        # One 2 MiB user-accessible page at 0: PML4[0] -> PDPT[0] -> PD[0] (PS).
        P, RW, US, PS = 1, 2, 4, 0x80
        self.mem.write_u64(PML4, (PML4 + 0x1000) | P | RW | US)
        self.mem.write_u64(PML4 + 0x1000, (PML4 + 0x2000) | P | RW | US)
        self.mem.write_u64(PML4 + 0x2000, 0 | P | RW | US | PS)

    def _setup_user(self, v, i):
        s = v.get_sregs()
        s.cr3 = PML4
        s.cr4 = 0x20  # PAE
        s.cr0 = 0x80000001 | 0x10 | 0x20  # PG | PE | ET | NE
        s.efer = 0x500  # LME | LMA
        cs = s.cs
        cs.base, cs.limit, cs.selector = 0, 0xFFFFFFFF, 0x1B
        cs.type, cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g = 11, 1, 3, 0, 1, 1, 1
        for seg in (s.ds, s.es, s.ss, s.fs, s.gs):
            seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, 0x23
            seg.type, seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 3, 1, 3, 1, 1, 0, 1
        s.tr.base, s.tr.limit, s.tr.selector, s.tr.type, s.tr.present, s.tr.s = 0, 0x67, 0x8, 11, 1, 0
        v.set_sregs(s)
        r = v.get_regs()
        r.rip, r.rflags = GUEST_CODE, 0x2
        r.rbx, r.rsp = counter_gpa(i), 0x8000
        v.set_regs(r)

    def start(self, handler):
        from vmm.runtime import VcpuThread

        handler.nstops_expected = len(self.vcpus)
        self.threads = [VcpuThread(self.vm, v, handler) for v in self.vcpus]
        for t in self.threads:
            t.start()
        for t in self.threads:
            t.wait_started(5)
        return self.threads

    def counter(self, i: int) -> int:
        return self.mem.read_u64(counter_gpa(i))

    def close(self):
        from vmm.runtime import request_stop

        request_stop(self.vm)
        for t in self.threads:
            t.join(10)
        assert not any(t.is_alive() for t in self.threads), "vCPU thread did not stop"
        self.vm.close()
        self.mem.close()
        self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_until(pred, timeout=10.0, interval=0.005):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
