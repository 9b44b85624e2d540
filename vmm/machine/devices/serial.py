"""A 16550A UART as a pure state machine (COM1, COM2), enough for Linux's 8250 driver.

Registers by offset from the base port (DLAB is LCR bit 7):
  0  RBR (read) / THR (write)          DLL when DLAB=1
  1  IER                               DLM when DLAB=1
  2  IIR (read) / FCR (write)
  3  LCR    4  MCR    5  LSR    6  MSR    7  SCR

Transmission is instantaneous: a THR write goes straight to `out` and the transmitter is
empty again at once, so LSR always has THRE|TEMT and a THRE interrupt (when enabled) is
pending again after each write until the guest reads IIR. The interrupt line is reported
through `irq(level)` on changes only; the in-kernel IOAPIC sees the edges.

`fast_path_changed(enabled)` tells the vCPU loop's C fast path when plain THR writes and
LSR reads can bypass this object: DLAB=0, THR interrupt off, not in loopback and no
received byte waiting (the C side answers LSR with THRE|TEMT only, and sends no IRQ).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from vmm.machine.layout import COM1_PORT, COM1_PORT_COUNT

# IER bits
IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
# IIR values
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0
# FCR bits
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
# LCR / MCR / LSR / MSR bits
LCR_DLAB = 0x80
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# A connected terminal: carrier, data set ready, clear to send.
DEFAULT_MSR = MSR_DCD | MSR_DSR | MSR_CTS

# The one queue a UART keeps: bytes buffered from feed() (host input, and the guest's own
# bytes in loopback) before new input counts as overrun. Transmitted bytes are not
# queued here: they go to `out` at once (COM1: the console pump's 64 KiB C ring, then the
# ConsoleLog's window; COM2: the request channel's bounded line assembler).
RX_FIFO_LIMIT = 1 << 16


class Serial16550:
    """A 16550 UART (COM1 by default; COM2 at another base): transmit to out(), input through
    feed(), interrupts through irq()."""

    PORT_COUNT = COM1_PORT_COUNT  # eight registers from the base port

    def __init__(self, base: int = COM1_PORT,
                 out: Callable[[bytes], None] | None = None,
                 irq: Callable[[bool], None] | None = None,
                 fast_path_changed: Callable[[bool], None] | None = None):
        self.base = base
        self.out = out or (lambda data: None)
        self.irq = irq or (lambda level: None)
        self.fast_path_changed = fast_path_changed or (lambda enabled: None)
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.msr = DEFAULT_MSR
        self.overrun = False
        self.thr_interrupt_pending = False
        self.rx: deque[int] = deque()
        self.irq_level = False
        self.fast_path = self._fast_path_allowed()
        # feed() comes from the host's input thread, io_in/io_out from vCPU threads.
        self._lock = threading.RLock()

    # --- snapshots -------------------------------------------------------------------
    STATE_FIELDS = ("ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm", "msr", "overrun",
                    "thr_interrupt_pending", "irq_level")

    def state(self) -> dict:
        """The registers and the queued received bytes, JSON-able (for snapshots)."""
        with self._lock:
            out = {k: getattr(self, k) for k in self.STATE_FIELDS}
            out["rx"] = bytes(self.rx).hex()
            return out

    def restore(self, state: dict) -> None:
        """Takes back what state() gave (on a new UART of a restored VM: the interrupt
        line's level lives in the restored irqchip, so it is not raised again here);
        ValueError naming a field that is missing or out of range."""
        with self._lock:
            values = {}
            for k in self.STATE_FIELDS:
                v = state[k]
                if isinstance(v, bool) or k in ("overrun", "thr_interrupt_pending", "irq_level"):
                    values[k] = bool(v)
                elif not isinstance(v, int) or not 0 <= v <= 0xFF:
                    raise ValueError(f"UART {self.base:#x} state: {k}={v!r} is not a byte")
                else:
                    values[k] = v
            rx = bytes.fromhex(state["rx"])
            if len(rx) > RX_FIFO_LIMIT:
                raise ValueError(f"UART {self.base:#x} state: {len(rx)} queued bytes exceed "
                                 f"the FIFO limit {RX_FIFO_LIMIT}")
            for k, v in values.items():
                setattr(self, k, v)
            self.rx = deque(rx)
            fast = self._fast_path_allowed()
            if fast != self.fast_path:
                self.fast_path = fast
                self.fast_path_changed(fast)

    def describe(self) -> str:
        """The registers that decide whether the guest's driver is waiting for us, in one
        line (a console that went silent: is THRI enabled with no THRE interrupt pending,
        the interrupt line low, so the guest's tty holds bytes it will never send?)."""
        with self._lock:
            return (f"UART {self.base:#x}: IER {self.ier:#04x} (THRI {'on' if self.ier & IER_THRI else 'off'}), "
                    f"THRE interrupt {'pending' if self.thr_interrupt_pending else 'not pending'}, "
                    f"IIR {self._interrupt_cause():#04x}, IRQ line {'high' if self.irq_level else 'low'}, "
                    f"LCR {self.lcr:#04x}, MCR {self.mcr:#04x}, FCR {self.fcr:#04x}, "
                    f"{len(self.rx)} byte(s) to read, fast path {'on' if self.fast_path else 'off'}")

    # --- host side -------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes typed on the console: they arrive in RBR and raise RDI when enabled."""
        with self._lock:
            for byte in data:
                self._receive(byte)
            self._update()

    # --- guest side --------------------------------------------------------------------
    def io_in(self, port: int, size: int = 1) -> int:
        with self._lock:
            return self._io_in(port, size)

    def io_out(self, port: int, size: int, value: int) -> None:
        with self._lock:
            self._io_out(port, size, value)

    def _io_in(self, port: int, size: int) -> int:
        offset = port - self.base
        dlab = self.lcr & LCR_DLAB
        if offset == 0:
            value = self.dll if dlab else self._read_rbr()
        elif offset == 1:
            value = self.dlm if dlab else self.ier
        elif offset == 2:
            value = self._read_iir()
        elif offset == 3:
            value = self.lcr
        elif offset == 4:
            value = self.mcr
        elif offset == 5:
            value = self._lsr()
            self.overrun = False  # reading LSR clears the error bits
        elif offset == 6:
            value = self._read_msr()
        elif offset == 7:
            value = self.scr
        else:
            return (1 << (8 * size)) - 1
        self._update()
        return value

    def _io_out(self, port: int, size: int, value: int) -> None:
        offset = port - self.base
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == 0:
            if dlab:
                self.dll = value
            else:
                self._write_thr(value)
        elif offset == 1:
            if dlab:
                self.dlm = value
            else:
                was_enabled = self.ier & IER_THRI
                self.ier = value & 0x0F
                # Enabling THRI while THR is empty (always, here) raises THRE at once:
                # that is how the 8250 driver starts transmitting.
                if self.ier & IER_THRI and not was_enabled:
                    self.thr_interrupt_pending = True
        elif offset == 2:
            self.fcr = value & 0xC9  # FIFO enable, DMA mode, trigger level
            if value & FCR_CLEAR_RCVR:
                self.rx.clear()
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self._write_mcr(value)
        elif offset == 7:
            self.scr = value
        # LSR and MSR writes are ignored (factory test only).
        self._update()

    # --- registers ------------------------------------------------------------------------
    def _write_thr(self, value: int) -> None:
        if self.mcr & MCR_LOOP:
            self._receive(value)  # loopback: what is sent comes straight back
        else:
            self.out(bytes([value]))
        self.thr_interrupt_pending = True

    def _read_rbr(self) -> int:
        return self.rx.popleft() if self.rx else 0

    def _read_iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0
        cause = self._interrupt_cause()
        if cause == IIR_THRI:
            # Reading IIR while it reports THRE acknowledges that interrupt.
            self.thr_interrupt_pending = False
        return cause | fifo

    def _lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT
        if self.rx:
            value |= LSR_DR
        if self.overrun:
            value |= LSR_OE
        return value

    def _read_msr(self) -> int:
        if self.mcr & MCR_LOOP:
            # Loopback wires the modem outputs to the inputs: RTS->CTS, DTR->DSR,
            # OUT1->RI, OUT2->DCD (Linux's autoconfig checks this).
            return ((self.mcr & MCR_RTS) << 3 | (self.mcr & MCR_DTR) << 5
                    | (self.mcr & MCR_OUT1) << 4 | (self.mcr & MCR_OUT2) << 4)
        value = self.msr
        self.msr &= 0xF0  # reading clears the delta bits
        return value

    def _write_mcr(self, value: int) -> None:
        was_loop = self.mcr & MCR_LOOP
        self.mcr = value & 0x1F
        if was_loop and not self.mcr & MCR_LOOP:
            self.msr = DEFAULT_MSR

    def _receive(self, byte: int) -> None:
        if len(self.rx) >= RX_FIFO_LIMIT:
            self.overrun = True
            return
        self.rx.append(byte)

    # --- interrupts and the fast path ---------------------------------------------------------
    def _interrupt_cause(self) -> int:
        if self.ier & IER_RLSI and self.overrun:
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_interrupt_pending:
            return IIR_THRI
        if self.ier & IER_MSI and self.msr & 0x0F:
            return IIR_MSI
        return IIR_NO_INT

    def _fast_path_allowed(self) -> bool:
        return (not self.lcr & LCR_DLAB and not self.ier & IER_THRI
                and not self.mcr & MCR_LOOP and not self.rx)

    def _update(self) -> None:
        level = self._interrupt_cause() != IIR_NO_INT
        if level != self.irq_level:
            self.irq_level = level
            self.irq(level)
        fast = self._fast_path_allowed()
        if fast != self.fast_path:
            self.fast_path = fast
            self.fast_path_changed(fast)
