"""Intel 8254 programmable interval timer (ports 0x40-0x43) and port 0x61.

Used by the tcg accelerator's userspace irqchip.  Counters run from the
host's monotonic clock at the PC's 1.193182 MHz, so a guest reading the
count sees real elapsed time.  Channel 0 drives IRQ0 (Linux uses mode 2 for
its periodic tick and mode 4 for one-shot events); channel 2 is gated by
port 0x61 bit 0 and its OUT is readable as port 0x61 bit 5 (Linux's PIT
calibration loads mode 0 and polls that bit).  Modes 0-5 follow the 8254
data sheet's OUT waveforms; mode 3's OUT is modelled as a square wave and
its IRQ fires once per period.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

PIT_HZ = 1_193_182
NS = 1_000_000_000


class Scheduler(Protocol):
    """Calls ``callback()`` at host monotonic time ``deadline_ns`` (from a timer thread)."""

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> object: ...

    def cancel(self, token: object) -> None: ...


def _ns_to_ticks(ns: int) -> int:
    return ns * PIT_HZ // NS


def _ticks_to_ns(ticks: int) -> int:
    return -(-ticks * NS // PIT_HZ)   # round up so a deadline is never early


@dataclass
class PitChannel:
    index: int
    count: int = 0x10000          # reload value (0 programs 65536)
    load_ns: int = 0              # when counting started
    mode: int = 0
    bcd: int = 0
    rw_mode: int = 3
    gate: bool = False
    read_state: int = 3
    write_state: int = 3
    write_latch: int = 0
    latched: int = 0              # 0 none, 1 lsb, 2 msb, 3 word
    latched_count: int = 0
    status_latched: bool = False
    status: int = 0
    null_count: bool = True
    armed: bool = False           # a count has been written since the mode was set

    def elapsed(self, now: int) -> int:
        return _ns_to_ticks(max(0, now - self.load_ns))

    def counter(self, now: int) -> int:
        d = self.elapsed(now)
        c = self.count
        if self.mode in (0, 1, 4, 5):
            return (c - d) & 0xFFFF
        if self.mode == 3:
            return c - ((2 * d) % c)
        return c - (d % c)            # mode 2

    def out(self, now: int) -> bool:
        d = self.elapsed(now)
        c = self.count
        if not self.armed:
            return self.mode != 0
        if self.mode == 0:
            return d >= c
        if self.mode == 1:
            return d >= c
        if self.mode == 2:
            return (d % c) != 0 or d == 0
        if self.mode == 3:
            return (d % c) < ((c + 1) >> 1)
        # modes 4 and 5: low for one clock at terminal count
        return d != c

    def next_irq_ns(self, now: int) -> int | None:
        """Host time of the next rising edge of IRQ0 for channel 0, or None."""
        if not self.armed:
            return None
        c = self.count
        d = self.elapsed(now)
        if self.mode == 0:
            return None if d >= c else self.load_ns + _ticks_to_ns(c)
        if self.mode in (2, 3):
            n = d // c + 1
            return self.load_ns + _ticks_to_ns(n * c)
        if self.mode == 4:
            return None if d > c else self.load_ns + _ticks_to_ns(c + 1)
        return None


class Pit:
    """Three channels; ``irq0(level)`` drives GSI 0."""

    def __init__(self, irq0: Callable[[bool], None], scheduler: Scheduler,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._irq0 = irq0
        self._sched = scheduler
        self._clock = clock
        self.channels = [PitChannel(i) for i in range(3)]
        self._timer: object | None = None
        self._refresh = 0
        self.speaker_data = False
        self.irq_count = 0
        self.reset()

    def reset(self) -> None:
        if self._timer is not None:
            self._sched.cancel(self._timer)
            self._timer = None
        now = self._clock()
        self.channels = [PitChannel(i, load_ns=now, gate=(i != 2)) for i in range(3)]
        self.speaker_data = False
        self._irq0(False)

    # -- channel 0 interrupt -------------------------------------------------------------------
    def _arm(self, now: int | None = None) -> None:
        """Schedule channel 0's next edge; a count load passes its own time as ``now`` so that a
        count shorter than the Python time since the load is still delivered (late, not lost)."""
        if self._timer is not None:
            self._sched.cancel(self._timer)
            self._timer = None
        ch = self.channels[0]
        when = ch.next_irq_ns(self._clock() if now is None else now)
        if when is not None:
            self._timer = self._sched.schedule(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        ch = self.channels[0]
        self.irq_count += 1
        if ch.mode == 0:
            self._irq0(True)          # OUT stays high until a new count is written
        else:
            self._irq0(False)
            self._irq0(True)
            if ch.mode == 4:
                ch.armed = False
        self._arm()

    # -- ports ---------------------------------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        if offset == 3:
            return 0xFF               # the control word register is write-only
        ch = self.channels[offset & 3]
        now = self._clock()
        if ch.status_latched:
            ch.status_latched = False
            return ch.status
        if ch.latched:
            if ch.latched == 1:
                ch.latched = 0
                return ch.latched_count & 0xFF
            if ch.latched == 2:
                ch.latched = 0
                return (ch.latched_count >> 8) & 0xFF
            ch.latched = 2
            return ch.latched_count & 0xFF
        c = ch.counter(now)
        if ch.read_state == 1:
            return c & 0xFF
        if ch.read_state == 2:
            return (c >> 8) & 0xFF
        if ch.read_state == 3:
            ch.read_state = 4
            return c & 0xFF
        ch.read_state = 3
        return (c >> 8) & 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        now = self._clock()
        if offset == 3:
            self._control(value, now)
            return
        ch = self.channels[offset & 3]
        if ch.write_state == 1:
            self._load(ch, value, now)
        elif ch.write_state == 2:
            self._load(ch, value << 8, now)
        elif ch.write_state == 3:
            ch.write_latch = value
            ch.write_state = 4
        else:
            ch.write_state = 3
            self._load(ch, ch.write_latch | (value << 8), now)

    def _control(self, value: int, now: int) -> None:
        sel = value >> 6
        if sel == 3:                                  # read-back
            for ch in self.channels:
                if value & (2 << ch.index):
                    if not value & 0x20 and not ch.latched:
                        ch.latched_count = ch.counter(now)
                        ch.latched = ch.rw_mode
                    if not value & 0x10 and not ch.status_latched:
                        ch.status = ((0x80 if ch.out(now) else 0) | (0x40 if ch.null_count else 0)
                                     | (ch.rw_mode << 4) | (ch.mode << 1) | ch.bcd)
                        ch.status_latched = True
            return
        ch = self.channels[sel]
        access = (value >> 4) & 3
        if access == 0:                               # counter latch
            if not ch.latched:
                ch.latched_count = ch.counter(now)
                ch.latched = ch.rw_mode
            return
        mode = (value >> 1) & 7
        if mode > 5:
            mode -= 4                                 # 6/7 alias 2/3
        ch.rw_mode = access
        ch.read_state = ch.write_state = access
        ch.mode = mode
        ch.bcd = value & 1
        ch.armed = False
        ch.null_count = True
        if ch.index == 0:
            if mode == 0:
                self._irq0(False)                     # mode 0 drives OUT low until terminal count
            # (the periodic modes raise IRQ0 at their first terminal count, not on programming)
            self._arm()

    def _load(self, ch: PitChannel, value: int, now: int) -> None:
        ch.count = value or 0x10000
        ch.load_ns = now
        ch.armed = True
        ch.null_count = False
        if ch.index == 0:
            if ch.mode == 0:
                self._irq0(False)
            self._arm(now)

    # -- port 0x61 -----------------------------------------------------------------------------
    def speaker_device(self) -> _SpeakerPort:
        return _SpeakerPort(self)

    def set_gate2(self, level: bool) -> None:
        ch = self.channels[2]
        if level and not ch.gate and ch.mode in (1, 2, 3, 5):
            ch.load_ns = self._clock()                # a rising gate (re)starts these modes
        if level and not ch.gate and ch.mode in (0, 4):
            ch.load_ns = self._clock()                # counting was suspended while low
        ch.gate = level

    def port61_read(self) -> int:
        self._refresh ^= 1
        ch = self.channels[2]
        out2 = ch.out(self._clock()) if ch.gate or ch.mode in (0, 4) else ch.mode != 0
        return ((1 if ch.gate else 0) | (2 if self.speaker_data else 0) | (self._refresh << 4)
                | (0x20 if out2 else 0))

    def port61_write(self, value: int) -> None:
        self.set_gate2(bool(value & 1))
        self.speaker_data = bool(value & 2)


class _SpeakerPort:
    def __init__(self, pit: Pit) -> None:
        self.pit = pit

    def io_read(self, offset: int, size: int) -> int:
        return self.pit.port61_read()

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.pit.port61_write(value)
