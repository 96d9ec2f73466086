"""16550A register semantics, driven the way Linux's 8250 driver and polling firmware do."""

from __future__ import annotations

from pyvmm.devices.serial import Serial
from pyvmm.irq import IrqLine
from support.chardev_helpers import RecordingBackend
from support.recording import RecordingSink

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7


def make() -> tuple[Serial, RecordingSink, RecordingBackend]:
    sink = RecordingSink()
    be = RecordingBackend()
    uart = Serial(IrqLine(sink, 4), be)
    return uart, sink, be


def rd(u: Serial, reg: int) -> int:
    return u.io_read(reg, 1)


def wr(u: Serial, reg: int, v: int) -> None:
    u.io_write(reg, 1, v)


def test_reset_values_and_attach():
    u, sink, be = make()
    assert be.receiver is u
    assert rd(u, IER) == 0
    assert rd(u, IIR) == 0x01
    assert rd(u, LSR) == 0x60  # THRE | TEMT, no data
    assert rd(u, MSR) & 0xF0 == 0xB0  # DCD | DSR | CTS
    assert not sink.levels.get(4, False)


def test_linux_autoconfig_probe():
    u, sink, _ = make()
    # Scratch test on IER: only the low 4 bits exist.
    wr(u, IER, 0)
    assert rd(u, IER) & 0x0F == 0
    wr(u, IER, 0x0F)
    assert rd(u, IER) & 0x0F == 0x0F
    wr(u, IER, 0xFF)
    assert rd(u, IER) == 0x0F  # UUE (bit 6) not writable: not an XScale
    wr(u, IER, 0)
    # Loopback test: MCR = LOOP | RTS | OUT2 must read MSR & 0xF0 == 0x90.
    save_mcr = rd(u, MCR)
    wr(u, MCR, 0x10 | 0x0A)
    assert rd(u, MSR) & 0xF0 == 0x90
    wr(u, MCR, save_mcr)
    # FIFO detection: IIR bits 7:6 == 11 -> 16550A.
    wr(u, LCR, 0)
    wr(u, FCR, 0x01)
    assert rd(u, IIR) >> 6 == 3
    # 16750 check: with DLAB set and the 64-byte bit, IIR bit 5 stays 0.
    wr(u, LCR, 0x80)
    wr(u, FCR, 0x01 | 0x20)
    status1 = rd(u, IIR) >> 5
    wr(u, LCR, 0)
    status2 = rd(u, IIR) >> 5
    assert (status1, status2) == (6, 6)
    # National SuperIO check: IIR bit 4 must not follow MCR loop.
    wr(u, LCR, 0xE0)
    assert rd(u, IIR) & 0x10 == 0
    wr(u, LCR, 0)
    # EFR probe at LCR=0xBF reads IIR, which is non-zero: not a 16650.
    wr(u, LCR, 0xBF)
    assert rd(u, 2) != 0
    wr(u, LCR, 0)
    # LSR safety check.
    assert rd(u, LSR) != 0xFF
    assert not sink.levels.get(4, False)


def test_thre_interrupt_as_8250_startup_tests_it():
    u, sink, be = make()
    wr(u, FCR, 0x07)
    # Enabling ETBEI with THR empty raises the THR-empty interrupt at once.
    wr(u, IER, 0x02)
    assert sink.levels[4] is True
    iir1 = rd(u, IIR)
    assert iir1 == 0xC2
    # Reading IIR while THRI is the source acknowledges it.
    assert sink.levels[4] is False
    assert rd(u, IIR) == 0xC1
    # The 0->1 transition of ETBEI re-asserts it (no UART_BUG_THRE).
    wr(u, IER, 0)
    wr(u, IER, 0x02)
    assert rd(u, IIR) & 0x0F == 0x02
    wr(u, IER, 0)
    assert rd(u, IIR) & 0x0F == 0x01
    assert sink.levels[4] is False
    # TXEN test: after IER=THRI, LSR shows TEMT and IIR is not NO_INT.
    wr(u, IER, 0x02)
    lsr = rd(u, LSR)
    iir = rd(u, IIR)
    wr(u, IER, 0)
    assert lsr & 0x40 and not iir & 0x01


def test_transmit_path_and_thr_reassert():
    u, sink, be = make()
    wr(u, LCR, 0x03)
    wr(u, IER, 0x02)
    assert rd(u, IIR) & 0x0F == 0x02  # ack
    assert not sink.levels[4]
    for c in b"hi\n":
        wr(u, THR, c)
    assert bytes(be.out) == b"hi\n"
    # THR emptied again after each byte: interrupt pending again, line high.
    assert sink.levels[4] is True
    assert rd(u, LSR) & 0x60 == 0x60
    # Driver has nothing more to send: clears ETBEI, line drops.
    wr(u, IER, 0)
    assert sink.levels[4] is False


def test_rx_fifo_trigger_and_timeout():
    u, sink, be = make()
    wr(u, FCR, 0x81)  # FIFO on, trigger 8 (Linux's 16550A setting)
    wr(u, IER, 0x01)
    assert u.can_receive() == 16
    u.receive(b"abc")
    assert u.can_receive() == 13
    assert sink.levels[4] is True
    assert rd(u, IIR) == 0xCC  # character timeout: below trigger
    u.receive(b"defgh")
    assert rd(u, IIR) == 0xC4  # at trigger level: data available
    assert rd(u, LSR) & 0x01
    got = bytearray()
    while rd(u, LSR) & 0x01:
        got.append(rd(u, RBR))
    assert bytes(got) == b"abcdefgh"
    assert rd(u, IIR) == 0xC1
    assert sink.levels[4] is False
    assert be.accept_calls == 8


def test_rx_fifo_disabled_holds_one_byte_and_overrun():
    u, sink, _ = make()
    wr(u, IER, 0x05)  # ERBFI | ELSI
    assert u.can_receive() == 1
    u.receive(b"x")
    assert u.can_receive() == 0
    assert rd(u, IIR) == 0x04  # no FIFO bits
    u.receive(b"y")  # overrun: dropped, OE latched
    assert rd(u, IIR) == 0x06  # line status has priority
    lsr = rd(u, LSR)
    assert lsr & 0x02 and lsr & 0x01
    assert rd(u, LSR) & 0x02 == 0  # OE cleared by reading LSR
    assert rd(u, IIR) == 0x04
    assert rd(u, RBR) == ord("x")
    assert rd(u, IIR) == 0x01
    assert sink.levels[4] is False


def test_fifo_clear_and_mode_change():
    u, _, be = make()
    wr(u, FCR, 0x01)
    u.receive(b"12345")
    assert u.rx_count() == 5
    wr(u, FCR, 0x03)  # clear RX
    assert u.rx_count() == 0
    assert rd(u, LSR) & 0x01 == 0
    u.receive(b"zz")
    wr(u, FCR, 0x00)  # leaving FIFO mode clears the FIFOs
    assert u.rx_count() == 0
    assert rd(u, IIR) & 0xC0 == 0
    assert be.accept_calls >= 2


def test_loopback_mode():
    u, sink, be = make()
    wr(u, FCR, 0x01)
    wr(u, IER, 0x01)
    wr(u, MCR, 0x10)
    assert u.can_receive() == 0  # external input disconnected in loopback
    wr(u, THR, 0x55)
    assert be.out == b""  # nothing leaves the chip
    assert rd(u, LSR) & 0x01
    assert sink.levels[4] is True
    assert rd(u, RBR) == 0x55
    assert sink.levels[4] is False
    before = be.accept_calls
    wr(u, MCR, 0x0B)  # leave loopback
    assert u.can_receive() == 16
    assert be.accept_calls > before


def test_modem_status_deltas_and_interrupt():
    u, sink, _ = make()
    wr(u, MCR, 0x10)  # loop, all outputs low
    rd(u, MSR)  # clear deltas from entering loopback
    wr(u, IER, 0x08)
    assert sink.levels.get(4, False) is False
    wr(u, MCR, 0x11)  # DTR -> DSR
    assert sink.levels[4] is True
    assert rd(u, IIR) == 0x00  # modem status interrupt
    msr = rd(u, MSR)
    assert msr & 0x20 and msr & 0x02  # DSR and DDSR
    assert sink.levels[4] is False
    assert rd(u, MSR) & 0x0F == 0
    wr(u, MCR, 0x14)  # OUT1 -> RI on
    wr(u, MCR, 0x10)  # RI off: trailing edge sets TERI
    assert rd(u, MSR) & 0x04


def test_dlab_divisor_and_scratch():
    u, _, _ = make()
    wr(u, LCR, 0x83)
    wr(u, DLL, 0x01)
    wr(u, DLM, 0x00)
    assert rd(u, DLL) == 0x01 and rd(u, DLM) == 0
    wr(u, LCR, 0x03)
    assert rd(u, IER) == 0  # the DLM write did not touch IER
    wr(u, SCR, 0xA5)
    assert rd(u, SCR) == 0xA5


def test_priority_rls_over_rx_over_thr():
    u, _, _ = make()
    wr(u, FCR, 0x01)
    wr(u, IER, 0x07)
    assert rd(u, IIR) & 0x0F == 0x02
    u.receive(b"a")
    wr(u, IER, 0x07)  # no transition: THRI not re-armed, but RX present
    assert rd(u, IIR) & 0x0F == 0x04  # trigger level 1 reached
    u.receive(bytes(16))  # 17 bytes into a 16-byte FIFO: overrun
    assert rd(u, IIR) & 0x0F == 0x06
    assert rd(u, LSR) & 0x02
    assert rd(u, IIR) & 0x0F == 0x04


def test_reset_clears_state_and_lowers_irq():
    u, sink, _ = make()
    wr(u, IER, 0x02)
    assert sink.levels[4]
    u.reset()
    assert sink.levels[4] is False
    assert rd(u, IER) == 0 and rd(u, IIR) == 0x01


def test_polling_guest_without_interrupts():
    """SeaBIOS-style: no IER, poll LSR for THRE and DR."""
    u, sink, be = make()
    for c in b"OK":
        while not rd(u, LSR) & 0x20:
            pass
        wr(u, THR, c)
    assert be.out == b"OK"
    u.receive(b"k")
    assert rd(u, LSR) & 0x01
    assert rd(u, RBR) == ord("k")
    assert sink.events == []  # the line never moved
