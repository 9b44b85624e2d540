from vmm.machine.devices.serial import Serial16550

BASE = 0x3F8
THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(BASE, BASE + 8)


def make():
    out, irqs, fast = [], [], []
    s = Serial16550(BASE, out=out.append, irq=irqs.append, fast_path_changed=fast.append)
    return s, out, irqs, fast


def test_plain_output_and_lsr():
    s, out, irqs, _ = make()
    for b in b"hi\n":
        s.io_out(THR, 1, b)
    assert b"".join(out) == b"hi\n"
    assert s.io_in(LSR, 1) & 0x60 == 0x60
    assert s.io_in(IIR, 1) == 0x01 and irqs == []


def test_divisor_latch_and_scratch():
    s, out, _, fast = make()
    s.io_out(LCR, 1, 0x83)
    s.io_out(THR, 1, 0x01)  # DLL
    s.io_out(IER, 1, 0x00)  # DLM
    assert (s.io_in(THR, 1), s.io_in(IER, 1)) == (1, 0)
    assert out == [] and fast == [False]
    s.io_out(LCR, 1, 0x03)
    assert fast == [False, True]
    s.io_out(SCR, 1, 0xA5)
    assert s.io_in(SCR, 1) == 0xA5


def test_thre_interrupt_cycle_like_the_8250_driver():
    s, out, irqs, fast = make()
    s.io_out(IER, 1, 0x02)  # enable THRI: THR is empty, so THRE fires at once
    assert irqs == [True] and fast == [False]
    assert s.io_in(IIR, 1) == 0x02  # THRE; reading acknowledges it
    assert irqs == [True, False]
    s.io_out(THR, 1, ord("x"))
    assert irqs == [True, False, True] and out == [b"x"]
    assert s.io_in(IIR, 1) == 0x02
    s.io_out(IER, 1, 0x00)  # driver stops tx
    assert s.io_in(IIR, 1) == 0x01 and fast[-1] is True and irqs[-1] is False


def test_describe_says_whether_the_driver_waits_for_a_thre_interrupt():
    s, _, _, _ = make()
    s.io_out(IER, 1, 0x02)
    assert "THRI on), THRE interrupt pending, IIR 0x02, IRQ line high" in s.describe()
    s.io_in(IIR, 1)  # acknowledged: a driver with bytes left now waits for the next one
    text = s.describe()
    assert "THRI on), THRE interrupt not pending, IIR 0x01, IRQ line low" in text
    assert text.startswith("UART 0x3f8: IER 0x02") and text.endswith("fast path off")


def test_receive_interrupt_and_rbr():
    s, _, irqs, fast = make()
    s.io_out(IER, 1, 0x01)
    s.feed(b"ab")
    assert irqs == [True] and fast == [False]  # LSR.DR must be seen: no fast path
    assert s.io_in(IIR, 1) == 0x04 and s.io_in(LSR, 1) & 1
    assert s.io_in(THR, 1) == ord("a") and s.io_in(THR, 1) == ord("b")
    assert s.io_in(LSR, 1) & 1 == 0 and irqs == [True, False] and fast[-1] is True


def test_loopback_as_linux_autoconfig_checks_it():
    s, out, _, _ = make()
    s.io_out(MCR, 1, 0x10 | 0x0A)  # LOOP | OUT2 | RTS
    assert s.io_in(MSR, 1) & 0xF0 == 0x90  # DCD | CTS
    s.io_out(THR, 1, 0x55)
    assert out == [] and s.io_in(LSR, 1) & 1 and s.io_in(THR, 1) == 0x55
    s.io_out(MCR, 1, 0x0B)
    assert s.io_in(MSR, 1) & 0xB0 == 0xB0


def test_fifo_bits_make_it_a_16550a():
    s, _, _, _ = make()
    s.io_out(IIR, 1, 0x01)  # FCR: enable FIFO
    assert s.io_in(IIR, 1) >> 6 == 3
    s.io_out(IIR, 1, 0x00)
    assert s.io_in(IIR, 1) >> 6 == 0


def test_overrun_is_reported_not_fatal():
    from vmm.machine.devices import serial

    s, _, _, _ = make()
    s.feed(b"x" * (serial.RX_FIFO_LIMIT + 5))
    assert s.io_in(LSR, 1) & 0x02
    assert s.io_in(LSR, 1) & 0x02 == 0
