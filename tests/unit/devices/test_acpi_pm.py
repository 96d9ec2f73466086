"""The ACPI PM device: S5 power-off, reset register, power button -> SCI, W1C status, PM timer."""

from __future__ import annotations

import threading

from pyvmm.bus import Bus
from pyvmm.devices.acpi_pm import AcpiPm, Pm1Cnt, Pm1En, Pm1Sts
from pyvmm.irq import IrqLine
from pyvmm.runstate import RequestKind, VmControl
from pyvmm.x86.pm_block import PM_SIZE, PM_TIMER_HZ, RESET_VALUE, SCI_GSI, SLP_TYP_S5, PmReg
from support.recording import RecordingSink

PM_BASE = 0x600


class FakeClock:
    def __init__(self) -> None:
        self.ns = 5_000_000

    def __call__(self) -> int:
        return self.ns


def make() -> tuple[AcpiPm, Bus, VmControl, RecordingSink, FakeClock]:
    sink = RecordingSink()
    control = VmControl()
    clock = FakeClock()
    pm = AcpiPm(control, IrqLine(sink, SCI_GSI), clock_ns=clock)
    bus = Bus("io")
    bus.register(PM_BASE, PM_SIZE, pm, "acpi-pm")
    return pm, bus, control, sink, clock


def test_sci_en_always_reads_set() -> None:
    _, bus, control, _, _ = make()
    assert bus.read(PM_BASE + PmReg.PM1_CNT, 2) & Pm1Cnt.SCI_EN
    bus.write(PM_BASE + PmReg.PM1_CNT, 2, 0)
    assert bus.read(PM_BASE + PmReg.PM1_CNT, 2) == Pm1Cnt.SCI_EN
    assert not control.pending()


def test_power_button_raises_sci_only_when_enabled_and_status_is_w1c() -> None:
    pm, bus, _, sink, _ = make()
    pm.press_power_button()
    assert bus.read(PM_BASE + PmReg.PM1_STS, 2) & Pm1Sts.PWRBTN
    assert sink.events == [] and not pm.sci_level  # not enabled yet: status only
    bus.write(PM_BASE + PmReg.PM1_EN, 2, Pm1En.PWRBTN)  # enabling with status pending fires at once
    assert sink.events == [(SCI_GSI, True)] and pm.sci_level
    bus.write(PM_BASE + PmReg.PM1_STS, 2, 0)  # writing 0 clears nothing
    assert pm.sci_level
    bus.write(PM_BASE + PmReg.PM1_STS, 2, ~Pm1Sts.PWRBTN & 0xFFFF)  # other bits: still nothing
    assert pm.sci_level and bus.read(PM_BASE + PmReg.PM1_STS, 2) & Pm1Sts.PWRBTN
    bus.write(PM_BASE + PmReg.PM1_STS, 2, Pm1Sts.PWRBTN)  # write 1 to clear
    assert not pm.sci_level and bus.read(PM_BASE + PmReg.PM1_STS, 2) == 0
    assert sink.events == [(SCI_GSI, True), (SCI_GSI, False)]
    pm.press_power_button()  # a second press with the event enabled
    assert sink.events[-1] == (SCI_GSI, True)
    # Linux reads the event block as one dword too: status in the low half, enable in the high half.
    assert bus.read(PM_BASE, 4) == (Pm1En.PWRBTN << 16) | Pm1Sts.PWRBTN
    bus.write(PM_BASE + PmReg.PM1_EN, 2, 0)  # disabling the event drops the line
    assert not pm.sci_level


def test_byte_access_to_status_and_enable() -> None:
    pm, bus, _, _, _ = make()
    bus.write(PM_BASE + PmReg.PM1_EN + 1, 1, Pm1En.PWRBTN >> 8)
    assert bus.read(PM_BASE + PmReg.PM1_EN, 2) == Pm1En.PWRBTN
    pm.press_power_button()
    assert pm.sci_level
    bus.write(PM_BASE + PmReg.PM1_STS, 1, 0xFF)  # the low byte holds no PWRBTN_STS
    assert pm.sci_level
    bus.write(PM_BASE + PmReg.PM1_STS + 1, 1, Pm1Sts.PWRBTN >> 8)
    assert not pm.sci_level


def test_s5_requests_poweroff() -> None:
    _, bus, control, _, _ = make()
    cnt = PM_BASE + PmReg.PM1_CNT
    # Linux first writes SLP_TYP alone, then SLP_TYP | SLP_EN.
    bus.write(cnt, 2, Pm1Cnt.SCI_EN | (SLP_TYP_S5 << 10))
    assert not control.pending()
    bus.write(cnt, 2, Pm1Cnt.SCI_EN | (SLP_TYP_S5 << 10) | Pm1Cnt.SLP_EN)
    req = control.wait(0)
    assert req is not None and req.kind is RequestKind.POWEROFF and req.reason == "ACPI S5"
    assert not bus.read(cnt, 2) & Pm1Cnt.SLP_EN  # SLP_EN is write-only


def test_s5_by_byte_write_of_the_high_half() -> None:
    _, bus, control, _, _ = make()
    bus.write(PM_BASE + PmReg.PM1_CNT + 1, 1, (SLP_TYP_S5 << 2) | (Pm1Cnt.SLP_EN >> 8))
    req = control.wait(0)
    assert req is not None and req.kind is RequestKind.POWEROFF


def test_unsupported_sleep_type_wakes_immediately() -> None:
    _, bus, control, _, _ = make()
    other = (SLP_TYP_S5 + 1) & 7
    bus.write(PM_BASE + PmReg.PM1_CNT, 2, (other << 10) | Pm1Cnt.SLP_EN)
    assert not control.pending()
    assert bus.read(PM_BASE + PmReg.PM1_STS, 2) & Pm1Sts.WAK  # the guest's wait loop ends
    bus.write(PM_BASE + PmReg.PM1_STS, 2, Pm1Sts.WAK)
    assert bus.read(PM_BASE + PmReg.PM1_STS, 2) == 0


def test_reset_register() -> None:
    _, bus, control, _, _ = make()
    bus.write(PM_BASE + PmReg.RESET, 1, RESET_VALUE ^ 0xFF)
    assert not control.pending()
    assert bus.read(PM_BASE + PmReg.RESET, 1) == 0
    bus.write(PM_BASE + PmReg.RESET, 1, RESET_VALUE)
    req = control.wait(0)
    assert req is not None and req.kind is RequestKind.RESET and req.reason == "ACPI reset"


def test_pm_timer_counts_at_3_579545_mhz_and_wraps_at_32_bits() -> None:
    _, bus, _, _, clock = make()
    tmr = PM_BASE + PmReg.PM_TMR
    assert bus.read(tmr, 4) == 0
    clock.ns += 1_000_000_000
    assert bus.read(tmr, 4) == PM_TIMER_HZ
    clock.ns += 1_000  # 1 us = 3.58 ticks
    assert bus.read(tmr, 4) == PM_TIMER_HZ + 3
    value = bus.read(tmr, 4)
    assert bus.read(tmr, 2) | (bus.read(tmr + 2, 2) << 16) == value  # split reads agree
    bus.write(tmr, 4, 0)  # read-only
    assert bus.read(tmr, 4) == value
    clock.ns += (1 << 32) * 1_000_000_000 // PM_TIMER_HZ + 1  # one full period later
    assert abs(bus.read(tmr, 4) - value) <= 1


def test_unused_offsets_and_reset() -> None:
    pm, bus, _, sink, _ = make()
    assert bus.read(PM_BASE + 0x0E, 2) == 0
    bus.write(PM_BASE + 0x0E, 2, 0xFFFF)  # ignored
    assert pm.io_read(PM_SIZE + 4, 4) == 0  # beyond the block: nothing, no exception
    pm.io_write(PM_SIZE + 4, 4, 0xFFFFFFFF)
    bus.write(PM_BASE + PmReg.PM1_EN, 2, 0xFFFF)
    assert bus.read(PM_BASE + PmReg.PM1_EN, 2) == (Pm1En.TMR | Pm1En.GBL | Pm1En.PWRBTN | Pm1En.SLPBTN
                                                     | Pm1En.RTC | Pm1En.PCIEXP_WAKE_DIS)
    pm.press_power_button()
    assert pm.sci_level
    pm.reset()
    assert not pm.sci_level
    assert bus.read(PM_BASE, 4) == 0
    assert bus.read(PM_BASE + PmReg.PM1_CNT, 2) == Pm1Cnt.SCI_EN
    assert sink.events[-1] == (SCI_GSI, False)


def test_power_button_from_another_thread_keeps_sci_consistent() -> None:
    pm, bus, _, sink, _ = make()
    bus.write(PM_BASE + PmReg.PM1_EN, 2, Pm1En.PWRBTN)
    stop = threading.Event()

    def presser() -> None:
        while not stop.is_set():
            pm.press_power_button()

    th = threading.Thread(target=presser)
    th.start()
    try:
        for _ in range(2000):
            if bus.read(PM_BASE + PmReg.PM1_STS, 2) & Pm1Sts.PWRBTN:
                bus.write(PM_BASE + PmReg.PM1_STS, 2, Pm1Sts.PWRBTN)
    finally:
        stop.set()
        th.join()
    status = bus.read(PM_BASE + PmReg.PM1_STS, 2)
    assert pm.sci_level == bool(status & Pm1Sts.PWRBTN)
    levels = [lvl for _, lvl in sink.events]
    assert all(a != b for a, b in zip(levels, levels[1:], strict=False))  # strictly alternating edges
