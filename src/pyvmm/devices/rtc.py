"""The MC146818 real-time clock and CMOS RAM at ports 0x70 (index) / 0x71 (data).

Time of day comes from the host clock in UTC plus an offset: the guest may
set the clock (Linux does on shutdown with ``hwclock --systohc``), which
changes only the offset.  While register B's SET bit is on, the clock reads
frozen and writes edit the frozen copy; clearing SET commits it, which is
how Linux's ``mc146818_set_time`` writes all fields atomically.

Formats follow register B: BCD or binary (DM bit), 24- or 12-hour with the
PM flag in bit 7 (24/12 bit).  Register A's update-in-progress bit is set
for the 244 microseconds before each second rolls over, as on the chip, so
guests that wait for UIP to drop before reading behave as on hardware.

Register C's flags: UF is set whenever a second boundary has passed since
the last read (computed lazily, so polling guests see it without a host
timer); with a main loop and an IRQ line, the periodic interrupt (PIE, at
register A's rate, capped at 1024 Hz), the update-ended interrupt (UIE) and
the alarm (AIE) raise IRQ8, which stays high until register C is read.

CMOS memory layout is what SeaBIOS and QEMU's PC machine use: base memory
(0x15/0x16), extended memory 1M..64M in KiB (0x17/0x18, 0x30/0x31), memory
above 16M in 64 KiB units (0x34/0x35), above 4G in 64 KiB units
(0x5b-0x5d), CPU count - 1 (0x5f), century (0x32) and the checksum over
0x10-0x2d at 0x2e/0x2f (big-endian).

Locking: vCPU threads (port access) and the loop thread (timers) share the
state, so every entry point takes ``self._lock``.
"""

from __future__ import annotations

import calendar
import logging
import math
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from pyvmm.irq import IrqLine
from pyvmm.loop import MainLoop, TimerHandle
from pyvmm.vmstate import VmStateError, fields

log = logging.getLogger(__name__)

RTC_IO_SIZE = 2
RTC_IRQ = 8
CMOS_SIZE = 128

#: UIP is set this long before each update (the chip's t_BUC).
UIP_WINDOW = 244e-6
#: Fastest periodic interrupt we emulate with host timers.
MAX_PERIODIC_HZ = 1024


class Reg(IntEnum):
    SECONDS = 0x00
    SECONDS_ALARM = 0x01
    MINUTES = 0x02
    MINUTES_ALARM = 0x03
    HOURS = 0x04
    HOURS_ALARM = 0x05
    DAY_OF_WEEK = 0x06
    DAY_OF_MONTH = 0x07
    MONTH = 0x08
    YEAR = 0x09
    A = 0x0A
    B = 0x0B
    C = 0x0C
    D = 0x0D
    SHUTDOWN = 0x0F
    BASE_MEM_LO = 0x15
    BASE_MEM_HI = 0x16
    EXT_MEM_LO = 0x17
    EXT_MEM_HI = 0x18
    CHECKSUM_HI = 0x2E
    CHECKSUM_LO = 0x2F
    EXT_MEM2_LO = 0x30
    EXT_MEM2_HI = 0x31
    CENTURY = 0x32
    MEM_ABOVE_16M_LO = 0x34
    MEM_ABOVE_16M_HI = 0x35
    MEM_ABOVE_4G = 0x5B      # three bytes, 0x5b-0x5d
    NB_CPUS = 0x5F


class RegA(IntEnum):
    UIP = 0x80
    DV_MASK = 0x70
    RS_MASK = 0x0F


class RegB(IntEnum):
    SET = 0x80
    PIE = 0x40
    AIE = 0x20
    UIE = 0x10
    SQWE = 0x08
    DM_BINARY = 0x04
    HOUR_24 = 0x02
    DSE = 0x01


class RegC(IntEnum):
    IRQF = 0x80
    PF = 0x40
    AF = 0x20
    UF = 0x10


REG_D_VRT = 0x80

#: Time fields we keep while SET is on: index into the list below.
_F_SEC, _F_MIN, _F_HOUR, _F_MDAY, _F_MON, _F_YEAR = range(6)


def to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


def periodic_hz(rs: int) -> float:
    """Periodic interrupt rate for register A's rate-select bits (32.768 kHz time base)."""
    if rs == 0:
        return 0.0
    if rs <= 2:
        return 256.0 / rs  # rates 1 and 2 alias to 256 and 128 Hz
    return float(32768 >> (rs - 1))


class Rtc:
    """MC146818 RTC + 128 bytes of CMOS; register at 0x70 with size 2."""

    def __init__(self, below_4g: int, above_4g: int = 0, ncpus: int = 1, *,
                 irq: IrqLine | None = None, loop: MainLoop | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._irq = irq
        self._loop = loop
        self._clock = clock
        self.cmos = bytearray(CMOS_SIZE)
        self.index = 0
        self.nmi_disabled = False
        self._offset = 0.0
        self._frozen: list[int] | None = None
        self._last_c_second = math.floor(clock())
        self._periodic_timer: TimerHandle | None = None
        self._periodic_period = 0.0
        self._update_timer: TimerHandle | None = None
        self._level = False
        self.cmos[Reg.A] = 0x26                                # 32.768 kHz base, 1024 Hz rate
        self.cmos[Reg.B] = RegB.HOUR_24                        # BCD, 24-hour
        self.cmos[Reg.D] = REG_D_VRT
        self._set_memory(below_4g, above_4g, ncpus)

    # -- CMOS memory layout ------------------------------------------------------------------
    def _set_memory(self, below_4g: int, above_4g: int, ncpus: int) -> None:
        c = self.cmos
        c[Reg.BASE_MEM_LO], c[Reg.BASE_MEM_HI] = 640 & 0xFF, 640 >> 8
        ext_kib = min(max(below_4g - (1 << 20), 0) // 1024, 0xFFFF)
        for lo in (Reg.EXT_MEM_LO, Reg.EXT_MEM2_LO):
            c[lo], c[lo + 1] = ext_kib & 0xFF, ext_kib >> 8
        above_16m = min(max(below_4g - (16 << 20), 0) // 65536, 0xFFFF)
        c[Reg.MEM_ABOVE_16M_LO], c[Reg.MEM_ABOVE_16M_HI] = above_16m & 0xFF, above_16m >> 8
        high = min(above_4g // 65536, 0xFF_FFFF)
        c[Reg.MEM_ABOVE_4G:Reg.MEM_ABOVE_4G + 3] = high.to_bytes(3, "little")
        c[Reg.NB_CPUS] = max(ncpus - 1, 0) & 0xFF
        year = time.gmtime(self._clock()).tm_year
        c[Reg.CENTURY] = to_bcd(year // 100)
        self.update_checksum()

    def update_checksum(self) -> None:
        """Store the standard checksum of bytes 0x10-0x2d at 0x2e (high) / 0x2f (low)."""
        total = sum(self.cmos[0x10:0x2E]) & 0xFFFF
        self.cmos[Reg.CHECKSUM_HI], self.cmos[Reg.CHECKSUM_LO] = total >> 8, total & 0xFF

    def reset(self) -> None:
        """Machine reset: interrupt enables and flags clear; time and CMOS contents survive."""
        with self._lock:
            self.cmos[Reg.B] &= ~(RegB.PIE | RegB.AIE | RegB.UIE | RegB.SQWE) & 0xFF
            self.cmos[Reg.C] = 0
            self._reschedule()
            self._set_irq(False)

    # -- VM state (pyvmm.vmstate) -----------------------------------------------------------
    vmstate_version = 1

    def save_state(self) -> dict[str, Any]:
        """CMOS, index, and the time base: the guest's offset from the host's wall clock (as QEMU,
        the guest's RTC keeps following real time on the destination)."""
        with self._lock:
            return {"cmos": bytes(self.cmos), "index": self.index, "nmi_disabled": self.nmi_disabled,
                    "offset": self._offset, "frozen": None if self._frozen is None else list(self._frozen),
                    "level": self._level}

    def load_state(self, state: dict[str, Any], version: int) -> None:
        cmos = fields.need(state, "cmos", bytes, "rtc")
        if len(cmos) != CMOS_SIZE:
            raise VmStateError(f"rtc: CMOS of {len(cmos)} bytes in the state (expected {CMOS_SIZE})")
        index = fields.need(state, "index", int, "rtc")
        offset = fields.need(state, "offset", (int, float), "rtc")
        frozen = state.get("frozen")
        if frozen is not None and (not isinstance(frozen, list) or len(frozen) != 6
                                   or not all(isinstance(v, int) for v in frozen)):
            raise VmStateError("rtc: frozen time in the state is invalid")
        with self._lock:
            self.cmos[:] = cmos
            self.index = index & 0x7F
            self.nmi_disabled = bool(state.get("nmi_disabled"))
            self._offset = float(offset)
            self._frozen = frozen
            self._reschedule()
            self._set_irq(bool(state.get("level")))

    # -- time conversion ---------------------------------------------------------------------
    def _now(self) -> float:
        return self._clock() + self._offset

    def _fields(self) -> list[int]:
        if self._frozen is not None:
            return list(self._frozen)
        t = time.gmtime(math.floor(self._now()))
        return [t.tm_sec, t.tm_min, t.tm_hour, t.tm_mday, t.tm_mon, t.tm_year]

    def _encode(self, v: int) -> int:
        # Masked: while SET is on the guest may have stored out-of-range fields (e.g. BCD 0xFF = 165).
        return (v if self.cmos[Reg.B] & RegB.DM_BINARY else to_bcd(v)) & 0xFF

    def _decode(self, v: int) -> int:
        return v if self.cmos[Reg.B] & RegB.DM_BINARY else from_bcd(v)

    def _encode_hour(self, hour: int) -> int:
        if self.cmos[Reg.B] & RegB.HOUR_24:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)

    def _decode_hour(self, v: int) -> int:
        if self.cmos[Reg.B] & RegB.HOUR_24:
            return self._decode(v)
        return self._decode(v & 0x7F) % 12 + (12 if v & 0x80 else 0)

    def _read_time_reg(self, reg: int) -> int:
        f = self._fields()
        if reg == Reg.SECONDS:
            return self._encode(f[_F_SEC])
        if reg == Reg.MINUTES:
            return self._encode(f[_F_MIN])
        if reg == Reg.HOURS:
            return self._encode_hour(f[_F_HOUR])
        if reg == Reg.DAY_OF_WEEK:
            # Python counts Monday=0; the RTC counts Sunday=1 .. Saturday=7.
            try:
                weekday = calendar.weekday(f[_F_YEAR], f[_F_MON], f[_F_MDAY])
            except ValueError:  # an invalid date written while SET is on: no weekday, not a crash
                return self._encode(1)
            return self._encode((weekday + 1) % 7 + 1)
        if reg == Reg.DAY_OF_MONTH:
            return self._encode(f[_F_MDAY])
        if reg == Reg.MONTH:
            return self._encode(f[_F_MON])
        if reg == Reg.YEAR:
            return self._encode(f[_F_YEAR] % 100)
        if reg == Reg.CENTURY:
            return self._encode(f[_F_YEAR] // 100)
        raise AssertionError(reg)

    def _write_time_reg(self, reg: int, value: int) -> None:
        f = self._fields()
        if reg == Reg.SECONDS:
            f[_F_SEC] = self._decode(value & 0x7F)
        elif reg == Reg.MINUTES:
            f[_F_MIN] = self._decode(value & 0x7F)
        elif reg == Reg.HOURS:
            f[_F_HOUR] = self._decode_hour(value)
        elif reg == Reg.DAY_OF_WEEK:
            return  # derived from the date
        elif reg == Reg.DAY_OF_MONTH:
            f[_F_MDAY] = self._decode(value)
        elif reg == Reg.MONTH:
            f[_F_MON] = self._decode(value)
        elif reg == Reg.YEAR:
            f[_F_YEAR] = f[_F_YEAR] // 100 * 100 + self._decode(value) % 100
        elif reg == Reg.CENTURY:
            f[_F_YEAR] = self._decode(value) * 100 + f[_F_YEAR] % 100
        if self._frozen is not None:
            self._frozen = f  # committed when SET is cleared
        else:
            self._commit(f)

    def _commit(self, f: list[int]) -> None:
        """Make the guest clock read ``f`` now, by moving the offset."""
        sec, minute, hour, mday, mon, year = f
        if not (0 <= sec < 60 and 0 <= minute < 60 and 0 <= hour < 24 and 1 <= mon <= 12
                and 1 <= mday <= calendar.monthrange(max(year, 1), mon)[1] and 1 <= year <= 9999):
            log.debug("rtc: ignoring invalid time %s", f)
            return
        target = calendar.timegm((year, mon, mday, hour, minute, sec, 0, 0, 0))
        now = self._clock()
        self._offset = target - math.floor(now)
        # Keep the sub-second phase of the host clock so seconds tick at host boundaries.

    def guest_time(self) -> float:
        """Seconds since the epoch as the guest's RTC currently reads (UTC)."""
        with self._lock:
            return self._now()

    # -- ports -------------------------------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        if offset != 1:
            return 0xFF  # the index port is write-only
        with self._lock:
            return self._read_cmos(self.index)

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == 0:
                self.index = value & 0x7F
                self.nmi_disabled = bool(value & 0x80)
            elif offset == 1:
                self._write_cmos(self.index, value)

    def _read_cmos(self, reg: int) -> int:
        if reg in (Reg.SECONDS, Reg.MINUTES, Reg.HOURS, Reg.DAY_OF_WEEK, Reg.DAY_OF_MONTH,
                   Reg.MONTH, Reg.YEAR, Reg.CENTURY):
            return self._read_time_reg(reg)
        if reg == Reg.A:
            value = self.cmos[Reg.A] & ~RegA.UIP & 0xFF
            if self._frozen is None:
                frac = self._now() % 1.0
                if frac >= 1.0 - UIP_WINDOW:
                    value |= RegA.UIP
            return value
        if reg == Reg.C:
            value = self.cmos[Reg.C]
            second = math.floor(self._now())
            if second != self._last_c_second and self._frozen is None:
                value |= RegC.UF  # an update happened since the last look
            self._last_c_second = second
            self.cmos[Reg.C] = 0
            self._set_irq(False)
            return value
        if reg == Reg.D:
            return REG_D_VRT
        return self.cmos[reg]

    def _write_cmos(self, reg: int, value: int) -> None:
        if reg in (Reg.SECONDS, Reg.MINUTES, Reg.HOURS, Reg.DAY_OF_WEEK, Reg.DAY_OF_MONTH,
                   Reg.MONTH, Reg.YEAR, Reg.CENTURY):
            self._write_time_reg(reg, value)
            if reg == Reg.CENTURY:
                self.cmos[reg] = value
            return
        if reg == Reg.A:
            self.cmos[Reg.A] = value & ~RegA.UIP & 0xFF
            self._reschedule()
        elif reg == Reg.B:
            old = self.cmos[Reg.B]
            if value & RegB.SET:
                value &= ~RegB.UIE & 0xFF  # SET inhibits updates and clears UIE
                if not old & RegB.SET:
                    self._frozen = self._fields()
            elif old & RegB.SET and self._frozen is not None:
                frozen, self._frozen = self._frozen, None
                self._commit(frozen)
            self.cmos[Reg.B] = value
            self._reschedule()
        elif reg in (Reg.C, Reg.D):
            pass  # read-only
        else:
            self.cmos[reg] = value

    # -- interrupts --------------------------------------------------------------------------
    def _set_irq(self, level: bool) -> None:
        if level != self._level:
            self._level = level
            if self._irq is not None:
                self._irq.set_level(level)

    def _flag(self, flag: int, enable_bit: int) -> None:
        self.cmos[Reg.C] |= flag
        if self.cmos[Reg.B] & enable_bit:
            self.cmos[Reg.C] |= RegC.IRQF
            self._set_irq(True)

    def _reschedule(self) -> None:
        """(Re)arm the host timers that back PIE and UIE/AIE (lock held)."""
        if self._loop is None:
            return
        b = self.cmos[Reg.B]
        hz = periodic_hz(self.cmos[Reg.A] & RegA.RS_MASK)
        want_periodic = bool(b & RegB.PIE) and hz > 0
        period = 1.0 / min(hz, MAX_PERIODIC_HZ) if want_periodic else 0.0
        if self._periodic_timer is not None and period != self._periodic_period:
            self._periodic_timer.cancel()
            self._periodic_timer = None
        if want_periodic and self._periodic_timer is None:
            self._periodic_period = period
            self._periodic_timer = self._loop.call_later(period, lambda: self._on_periodic(period))
        want_update = bool(b & (RegB.UIE | RegB.AIE)) and not b & RegB.SET
        if self._update_timer is not None and not want_update:
            self._update_timer.cancel()
            self._update_timer = None
        if want_update and self._update_timer is None:
            # A millisecond late, so the new second is already visible when the timer runs.
            self._update_timer = self._loop.call_later(1.001 - self._now() % 1.0, self._on_update)

    def _on_periodic(self, period: float) -> None:
        assert self._loop is not None
        with self._lock:
            if self._periodic_timer is None or self._periodic_period != period:
                return
            self._flag(RegC.PF, RegB.PIE)
            self._periodic_timer = self._loop.call_later(period, lambda: self._on_periodic(period))

    def _on_update(self) -> None:
        assert self._loop is not None
        with self._lock:
            if self._update_timer is None:
                return
            self._update_timer = None
            if self._frozen is None:
                self._flag(RegC.UF, RegB.UIE)
                if self._alarm_matches():
                    self._flag(RegC.AF, RegB.AIE)
            self._reschedule()

    def _alarm_matches(self) -> bool:
        f = self._fields()
        checks = ((Reg.SECONDS_ALARM, self._encode(f[_F_SEC])),
                  (Reg.MINUTES_ALARM, self._encode(f[_F_MIN])),
                  (Reg.HOURS_ALARM, self._encode_hour(f[_F_HOUR])))
        # An alarm byte with its top two bits set is "don't care".
        return all(self.cmos[reg] & 0xC0 == 0xC0 or self.cmos[reg] == now for reg, now in checks)

    @property
    def irq_level(self) -> bool:
        return self._level
