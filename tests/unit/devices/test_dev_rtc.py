"""MC146818 RTC/CMOS: time formats, setting the clock, UIP, memory bytes, interrupts."""

from __future__ import annotations

import calendar
import threading
import time

from pyvmm.devices.rtc import Rtc
from pyvmm.irq import IrqLine
from pyvmm.loop import MainLoop

MiB = 1 << 20
GiB = 1 << 30


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sink:
    def __init__(self) -> None:
        self.levels: dict[int, bool] = {}
        self.changed = threading.Event()

    def set_irq(self, gsi: int, level: bool) -> None:
        self.levels[gsi] = level
        self.changed.set()


def cmos_read(r: Rtc, idx: int) -> int:
    r.io_write(0, 1, idx)
    return r.io_read(1, 1)


def cmos_write(r: Rtc, idx: int, v: int) -> None:
    r.io_write(0, 1, idx)
    r.io_write(1, 1, v)


# 2024-02-29 13:45:07 UTC, a Thursday.
T0 = calendar.timegm((2024, 2, 29, 13, 45, 7, 0, 0, 0)) + 0.25


def make(below=512 * MiB, above=0, ncpus=1) -> tuple[Rtc, FakeClock]:
    clk = FakeClock(T0)
    return Rtc(below, above, ncpus, clock=clk), clk


def test_bcd_24h_defaults():
    r, _ = make()
    assert cmos_read(r, 0x0B) & 0x06 == 0x02  # BCD, 24h
    assert cmos_read(r, 0x00) == 0x07
    assert cmos_read(r, 0x02) == 0x45
    assert cmos_read(r, 0x04) == 0x13
    assert cmos_read(r, 0x06) == 5  # Thursday (Sunday = 1)
    assert cmos_read(r, 0x07) == 0x29
    assert cmos_read(r, 0x08) == 0x02
    assert cmos_read(r, 0x09) == 0x24
    assert cmos_read(r, 0x32) == 0x20
    assert cmos_read(r, 0x0D) == 0x80
    assert cmos_read(r, 0x0A) & 0x7F == 0x26


def test_binary_and_12h():
    r, _ = make()
    cmos_write(r, 0x0B, 0x04)  # binary, 12-hour
    assert cmos_read(r, 0x00) == 7
    assert cmos_read(r, 0x04) == 0x80 | 1  # 1 PM
    assert cmos_read(r, 0x09) == 24
    cmos_write(r, 0x0B, 0x00)  # BCD, 12-hour
    assert cmos_read(r, 0x04) == 0x81


def test_index_nmi_bit_and_write_only_index():
    r, _ = make()
    r.io_write(0, 1, 0x80 | 0x0D)
    assert r.nmi_disabled
    assert r.io_read(1, 1) == 0x80
    assert r.io_read(0, 1) == 0xFF


def test_time_advances_with_host_clock():
    r, clk = make()
    clk.t += 60
    assert cmos_read(r, 0x02) == 0x46
    assert cmos_read(r, 0x00) == 0x07


def test_set_time_with_set_bit_like_linux():
    r, clk = make()
    cmos_write(r, 0x0B, 0x82)  # SET, BCD, 24h
    clk.t += 10  # frozen while SET is on
    assert cmos_read(r, 0x00) == 0x07
    for idx, v in ((0x00, 0x30), (0x02, 0x59), (0x04, 0x23), (0x07, 0x31), (0x08, 0x12), (0x09, 0x99),
                   (0x32, 0x19)):
        cmos_write(r, idx, v)
    cmos_write(r, 0x0B, 0x02)
    assert abs(r.guest_time() - calendar.timegm((1999, 12, 31, 23, 59, 30, 0, 0, 0)) - 0.25) < 1e-6
    clk.t += 31
    assert [cmos_read(r, i) for i in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32)] == \
        [0x01, 0x00, 0x00, 0x01, 0x01, 0x00, 0x20]


def test_single_register_write_moves_offset():
    r, clk = make()
    cmos_write(r, 0x04, 0x01)  # 01:45:07
    assert cmos_read(r, 0x04) == 0x01
    clk.t += 3600
    assert cmos_read(r, 0x04) == 0x02
    cmos_write(r, 0x08, 0x13)  # invalid month: ignored
    assert cmos_read(r, 0x08) == 0x02


def test_uip_window():
    r, clk = make()
    clk.t = T0 - 0.25 + 0.5
    assert not cmos_read(r, 0x0A) & 0x80
    clk.t = T0 - 0.25 + 0.9999
    assert cmos_read(r, 0x0A) & 0x80
    cmos_write(r, 0x0B, 0x82)  # SET inhibits updates
    assert not cmos_read(r, 0x0A) & 0x80


def test_register_c_update_flag_lazy():
    r, clk = make()
    cmos_read(r, 0x0C)
    assert cmos_read(r, 0x0C) & 0x10 == 0
    clk.t += 1
    assert cmos_read(r, 0x0C) & 0x10
    assert cmos_read(r, 0x0C) == 0


def test_memory_bytes_and_checksum():
    r, _ = make(below=3 * GiB, above=5 * GiB, ncpus=2)
    rd = lambda i: cmos_read(r, i)  # noqa: E731
    assert rd(0x15) | rd(0x16) << 8 == 640
    assert rd(0x17) | rd(0x18) << 8 == 0xFFFF  # capped
    assert rd(0x30) | rd(0x31) << 8 == 0xFFFF
    assert rd(0x34) | rd(0x35) << 8 == (3 * GiB - 16 * MiB) // 65536
    assert rd(0x5B) | rd(0x5C) << 8 | rd(0x5D) << 16 == 5 * GiB // 65536
    assert rd(0x5F) == 1
    total = sum(rd(i) for i in range(0x10, 0x2E))
    assert (rd(0x2E) << 8 | rd(0x2F)) == total


def test_small_memory_bytes():
    r, _ = make(below=32 * MiB)
    assert cmos_read(r, 0x17) | cmos_read(r, 0x18) << 8 == 31 * 1024
    assert cmos_read(r, 0x34) | cmos_read(r, 0x35) << 8 == (16 * MiB) // 65536
    assert [cmos_read(r, i) for i in (0x5B, 0x5C, 0x5D)] == [0, 0, 0]


def test_plain_cmos_bytes_are_ram():
    r, _ = make()
    cmos_write(r, 0x0F, 0x0A)
    assert cmos_read(r, 0x0F) == 0x0A
    cmos_write(r, 0x0D, 0x00)
    assert cmos_read(r, 0x0D) == 0x80  # read-only


def test_periodic_interrupt_with_loop():
    loop = MainLoop("rtc-test")
    loop.start_thread()
    sink = Sink()
    try:
        r = Rtc(64 * MiB, irq=IrqLine(sink, 8), loop=loop)
        cmos_write(r, 0x0A, 0x26)  # 1024 Hz
        cmos_write(r, 0x0B, 0x42)  # PIE
        assert sink.changed.wait(2.0), "no periodic interrupt within 2 s"
        assert sink.levels[8] is True
        c = cmos_read(r, 0x0C)
        assert c & 0xC0 == 0xC0  # IRQF | PF
        assert sink.levels[8] is False
        cmos_write(r, 0x0B, 0x02)  # PIE off
        time.sleep(0.05)
        cmos_read(r, 0x0C)
        sink.changed.clear()
        time.sleep(0.05)
        assert not sink.changed.is_set()
    finally:
        loop.stop_thread()
        loop.close()


def test_update_interrupt_with_loop():
    loop = MainLoop("rtc-test")
    loop.start_thread()
    sink = Sink()
    try:
        r = Rtc(64 * MiB, irq=IrqLine(sink, 8), loop=loop)
        cmos_write(r, 0x0B, 0x12)  # UIE
        assert sink.changed.wait(2.5), "no update interrupt within 2.5 s"
        assert cmos_read(r, 0x0C) & 0x90 == 0x90
        r.reset()
        assert cmos_read(r, 0x0B) & 0x70 == 0
    finally:
        loop.stop_thread()
        loop.close()


def test_alarm_interrupt_with_dont_care_bytes():
    loop = MainLoop("rtc-test")
    loop.start_thread()
    sink = Sink()
    try:
        r = Rtc(64 * MiB, irq=IrqLine(sink, 8), loop=loop)
        for idx in (0x01, 0x03, 0x05):
            cmos_write(r, idx, 0xFF)  # "don't care": fires every second
        cmos_write(r, 0x0B, 0x22)  # AIE
        assert sink.changed.wait(2.5), "no alarm interrupt within 2.5 s"
        c = cmos_read(r, 0x0C)
        assert c & 0xA0 == 0xA0  # IRQF | AF
    finally:
        loop.stop_thread()
        loop.close()
