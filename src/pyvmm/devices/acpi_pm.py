"""ACPI fixed-hardware power-management registers (an I/O-port device).

A stock Linux guest finds these registers through the FADT and uses them to

* power off: it writes SLP_TYP (the value from the DSDT's ``\\_S5`` package)
  together with SLP_EN into PM1a_CNT -- we then ask the machine to power off;
* reboot: it writes the FADT's reset value to the reset register -- we then
  ask the machine to reset;
* learn that the power button was pressed: PWRBTN_STS is set in PM1a_STS
  and, if the guest enabled PWRBTN_EN, the SCI (a level-triggered interrupt,
  GSI 9) is raised until the guest clears the status bit by writing 1 to it;
* keep time: the PM timer counts at 3.579545 MHz, derived here from the host's
  monotonic clock, so it never drifts or stops when the VM is paused.

There is no SMI command port (FADT SMI_CMD = 0): the machine is always in
ACPI mode, so SCI_EN always reads as 1.  The timer's carry status (TMR_STS)
is never set, so TMR_EN raises nothing; Linux only reads the counter.  Register layout, relative to the
block's base (the machine registers :data:`PM_SIZE` ports at ``pm_base``)::

    +0x00 PM1a_STS  (2)   W1C status
    +0x02 PM1a_EN   (2)   enables
    +0x04 PM1a_CNT  (2)   SCI_EN / SLP_TYP / SLP_EN
    +0x08 PM_TMR    (4)   32-bit timer, read-only
    +0x0C RESET     (1)   write RESET_VALUE to reset

Any access size at any offset inside the block works (byte-wise merge), since
the guest's ACPI code picks access widths from the FADT and may split them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import IntFlag
from typing import Any

from pyvmm.irq import IrqLine
from pyvmm.ratelimit import guest_log
from pyvmm.runstate import VmControl
from pyvmm.vmstate import fields
from pyvmm.x86.pm_block import (
    PM_SIZE,
    PM_TIMER_HZ,
    PM_TMR_32BIT,
    RESET_VALUE,
    SLP_TYP_S5,
    PmReg,
)

log = logging.getLogger(__name__)


class Pm1Sts(IntFlag):
    TMR = 1 << 0
    BM = 1 << 4
    GBL = 1 << 5
    PWRBTN = 1 << 8
    SLPBTN = 1 << 9
    RTC = 1 << 10
    PCIEXP_WAKE = 1 << 14
    WAK = 1 << 15


class Pm1En(IntFlag):
    TMR = 1 << 0
    GBL = 1 << 5
    PWRBTN = 1 << 8
    SLPBTN = 1 << 9
    RTC = 1 << 10
    PCIEXP_WAKE_DIS = 1 << 14


class Pm1Cnt(IntFlag):
    SCI_EN = 1 << 0
    BM_RLD = 1 << 1
    GBL_RLS = 1 << 2
    SLP_TYP = 0x7 << 10
    SLP_EN = 1 << 13


_SLP_TYP_SHIFT = 10
#: Status bits that raise the SCI when their enable bit is set (same bit positions in EN).
_SCI_EVENTS = int(Pm1Sts.TMR | Pm1Sts.GBL | Pm1Sts.PWRBTN | Pm1Sts.SLPBTN | Pm1Sts.RTC)
_EN_WRITABLE = int(Pm1En.TMR | Pm1En.GBL | Pm1En.PWRBTN | Pm1En.SLPBTN | Pm1En.RTC | Pm1En.PCIEXP_WAKE_DIS)
#: Bits of PM1_CNT that are stored and read back (SLP_EN and GBL_RLS are write-only).
_CNT_STORED = int(Pm1Cnt.SCI_EN | Pm1Cnt.BM_RLD | Pm1Cnt.SLP_TYP)
_TMR_MASK = 0xFFFF_FFFF if PM_TMR_32BIT else 0xFF_FFFF

# (offset, width) of each register; byte offsets not covered read as 0 and ignore writes.
_REGS: tuple[tuple[PmReg, int], ...] = (
    (PmReg.PM1_STS, 2), (PmReg.PM1_EN, 2), (PmReg.PM1_CNT, 2), (PmReg.PM_TMR, 4), (PmReg.RESET, 1),
)


def _byte_map() -> tuple[tuple[PmReg, int] | None, ...]:
    """For each byte offset of the block: (register, byte index inside it), or None."""
    table: list[tuple[PmReg, int] | None] = [None] * PM_SIZE
    for reg, width in _REGS:
        for i in range(width):
            table[reg + i] = (reg, i)
    return tuple(table)


_BYTE_MAP = _byte_map()


class AcpiPm:
    """PM1a event/control blocks, PM timer and reset register.

    ``control`` receives power-off and reset requests; ``sci`` is the line to
    GSI :data:`SCI_GSI`.  ``clock_ns`` (monotonic nanoseconds) is replaceable for tests.
    All state is guarded by one lock, because vCPU threads access the ports
    while the monitor thread may press the power button.
    """

    def __init__(self, control: VmControl, sci: IrqLine,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._control = control
        self._sci = sci
        self._clock_ns = clock_ns
        self._t0 = clock_ns()
        self._lock = threading.Lock()
        self._sts = 0
        self._en = 0
        self._cnt = int(Pm1Cnt.SCI_EN)
        self._warned_sleep_types: set[int] = set()  # at most 8 (SLP_TYP is 3 bits)

    # -- machine-facing API -------------------------------------------------------------------
    def press_power_button(self) -> None:
        """Latch a power-button press (QMP ``system_powerdown``); safe from any thread."""
        with self._lock:
            self._sts |= int(Pm1Sts.PWRBTN)
            enabled = bool(self._en & Pm1En.PWRBTN)
            self._update_sci()
        log.info("ACPI power button pressed (PWRBTN_EN=%d)", enabled)

    def reset(self) -> None:
        """Back to power-on state on machine reset (the timer keeps counting, as on hardware)."""
        with self._lock:
            self._sts = 0
            self._en = 0
            self._cnt = int(Pm1Cnt.SCI_EN)
            self._update_sci()

    # -- VM state (pyvmm.vmstate) -----------------------------------------------------------
    vmstate_version = 1

    def save_state(self) -> dict[str, Any]:
        """PM1 registers and the PM timer's count (as elapsed time, so it continues, not jumps)."""
        with self._lock:
            return {"sts": self._sts, "en": self._en, "cnt": self._cnt,
                    "timer_ns": self._clock_ns() - self._t0}

    def load_state(self, state: dict[str, Any], version: int) -> None:
        sts, en, cnt, timer_ns = (fields.need(state, k, int, "acpi-pm") for k in ("sts", "en", "cnt", "timer_ns"))
        with self._lock:
            self._sts, self._en = sts & 0xFFFF, en & _EN_WRITABLE
            self._cnt = (cnt & _CNT_STORED) | int(Pm1Cnt.SCI_EN)
            self._t0 = self._clock_ns() - max(0, timer_ns)
            self._update_sci()

    @property
    def sci_level(self) -> bool:
        return self._sci.level

    # -- port I/O -----------------------------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        if offset == PmReg.PM_TMR and size == 4:  # the hot path: clocksource reads
            return self._timer()
        value = 0
        with self._lock:
            for i in range(size):
                off = offset + i
                if not 0 <= off < PM_SIZE or (slot := _BYTE_MAP[off]) is None:
                    continue
                reg, byte = slot
                value |= ((self._read_reg(reg) >> (8 * byte)) & 0xFF) << (8 * i)
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        # Gather the bytes per register first, so a 2-byte write to PM1_CNT is one
        # register write (SLP_TYP and SLP_EN must be seen together).
        parts: dict[PmReg, list[int]] = {}
        for i in range(size):
            off = offset + i
            if not 0 <= off < PM_SIZE or (slot := _BYTE_MAP[off]) is None:
                continue
            reg, byte = slot
            acc = parts.setdefault(reg, [0, 0])
            acc[0] |= ((value >> (8 * i)) & 0xFF) << (8 * byte)
            acc[1] |= 0xFF << (8 * byte)
        if not parts:
            log.debug("acpi-pm: write to unused offset %#x size %d", offset, size)
            return
        with self._lock:
            for reg, (val, mask) in parts.items():
                self._write_reg(reg, val, mask)

    # -- registers (called with the lock held) -------------------------------------------------
    def _timer(self) -> int:
        elapsed = self._clock_ns() - self._t0
        return (elapsed * PM_TIMER_HZ // 1_000_000_000) & _TMR_MASK

    def _read_reg(self, reg: PmReg) -> int:
        if reg == PmReg.PM1_STS:
            return self._sts
        if reg == PmReg.PM1_EN:
            return self._en
        if reg == PmReg.PM1_CNT:
            return self._cnt
        if reg == PmReg.PM_TMR:
            return self._timer()
        return 0  # RESET reads as 0

    def _write_reg(self, reg: PmReg, value: int, mask: int) -> None:
        value &= mask
        if reg == PmReg.PM1_STS:
            self._sts &= ~value  # write 1 to clear
            self._update_sci()
        elif reg == PmReg.PM1_EN:
            self._en = ((self._en & ~mask) | value) & _EN_WRITABLE
            self._update_sci()
        elif reg == PmReg.PM1_CNT:
            merged = (self._cnt & ~mask) | value
            # SCI_EN stays set: without an SMI command port the machine is always in ACPI mode.
            self._cnt = (merged & _CNT_STORED) | int(Pm1Cnt.SCI_EN)
            if value & Pm1Cnt.SLP_EN:
                self._sleep((merged & Pm1Cnt.SLP_TYP) >> _SLP_TYP_SHIFT)
        elif reg == PmReg.RESET:
            if value & 0xFF == RESET_VALUE:
                guest_log(log, logging.INFO, "ACPI reset register written: resetting")
                self._control.request_reset("ACPI reset")
            else:
                log.debug("acpi-pm: reset register written with %#x, ignored", value)
        # PM_TMR is read-only

    def _sleep(self, slp_typ: int) -> None:
        if slp_typ == SLP_TYP_S5:
            log.info("guest entered ACPI S5: powering off")
            self._control.request_poweroff("ACPI S5")
            return
        # Sleep states we do not advertise: wake at once so the guest's wait loop ends.
        # Logged once per sleep type: a guest can retry in a loop, one VM exit per line otherwise.
        if slp_typ not in self._warned_sleep_types:
            self._warned_sleep_types.add(slp_typ)
            log.warning("guest requested unsupported ACPI sleep type %d; waking immediately", slp_typ)
        else:
            log.debug("guest requested unsupported ACPI sleep type %d again", slp_typ)
        self._sts |= int(Pm1Sts.WAK)

    def _update_sci(self) -> None:
        level = bool(self._cnt & Pm1Cnt.SCI_EN) and bool(self._sts & self._en & _SCI_EVENTS)
        self._sci.set_level(level)
