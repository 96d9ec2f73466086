"""Local APIC (xAPIC, MMIO at 0xfee00000) for the tcg accelerator's userspace irqchip.

Models what a single-socket guest uses: IRR/ISR/TMR with TPR/PPR
prioritisation, EOI (with EOI broadcast to the I/O APIC for level-triggered
vectors), the spurious-vector register's software enable, the LVT entries,
the timer in one-shot, periodic and TSC-deadline mode driven by host
monotonic time (the IA32_TSC_DEADLINE MSR arrives via :meth:`Lapic.set_tsc_deadline`), and
the ICR for fixed IPIs (including self-IPIs).  INIT/SIPI/NMI IPIs are
accepted and recorded for the accelerator; with one vCPU they are not needed.

Like the 8259 model this class does no locking; the irqchip wraps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

from pyvmm.devices.pit import Scheduler

NS = 1_000_000_000
VERSION = 0x00050014          # integrated APIC, 6 LVT entries


class Reg(IntEnum):
    ID = 0x20
    VERSION = 0x30
    TPR = 0x80
    APR = 0x90
    PPR = 0xA0
    EOI = 0xB0
    RRD = 0xC0
    LDR = 0xD0
    DFR = 0xE0
    SVR = 0xF0
    ISR0 = 0x100
    TMR0 = 0x180
    IRR0 = 0x200
    ESR = 0x280
    LVT_CMCI = 0x2F0
    ICR_LO = 0x300
    ICR_HI = 0x310
    LVT_TIMER = 0x320
    LVT_THERMAL = 0x330
    LVT_PERF = 0x340
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    LVT_ERROR = 0x370
    TMICT = 0x380
    TMCCT = 0x390
    TDCR = 0x3E0


class DeliveryMode(IntEnum):
    FIXED = 0
    LOWEST = 1
    SMI = 2
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


LVT_MASKED = 1 << 16
LVT_LEVEL = 1 << 15
SVR_ENABLE = 1 << 8
SVR_SUPPRESS_EOI_BROADCAST = 1 << 12
_LVT_REGS = (Reg.LVT_CMCI, Reg.LVT_TIMER, Reg.LVT_THERMAL, Reg.LVT_PERF, Reg.LVT_LINT0, Reg.LVT_LINT1,
             Reg.LVT_ERROR)
TIMER_ONESHOT = 0
TIMER_PERIODIC = 1
TIMER_TSC_DEADLINE = 2


def _highest(bits: int) -> int:
    return bits.bit_length() - 1


class Lapic:
    """One CPU's local APIC.

    ``on_change()`` is called whenever the set of deliverable interrupts may
    have changed; ``eoi_broadcast(vector)`` when a level-triggered vector is
    EOIed; ``send_ipi(src, icr_lo, icr_hi)`` for ICR writes.
    """

    def __init__(self, apic_id: int, bus_hz: int, scheduler: Scheduler, *,
                 on_change: Callable[[], None], eoi_broadcast: Callable[[int], None],
                 send_ipi: Callable[[Lapic, int, int], None],
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.apic_id = apic_id
        self.bus_hz = bus_hz
        self._sched = scheduler
        self._clock = clock
        self._on_change = on_change
        self._eoi_broadcast = eoi_broadcast
        self._send_ipi = send_ipi
        self._timer: object | None = None
        self.timer_fired = 0
        self.reset()

    def reset(self) -> None:
        if self._timer is not None:
            self._sched.cancel(self._timer)
            self._timer = None
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.esr = 0
        self.icr_lo = 0
        self.icr_hi = 0
        self.lvt: dict[int, int] = {r: LVT_MASKED for r in _LVT_REGS}
        if self.apic_id == 0:
            # As firmware leaves it: the BSP's LINT0 takes the 8259 (ExtINT), LINT1 is NMI.
            self.lvt[Reg.LVT_LINT0] = DeliveryMode.EXTINT << 8
            self.lvt[Reg.LVT_LINT1] = DeliveryMode.NMI << 8
        self.tmict = 0
        self.tdcr = 0
        self.timer_start_ns = 0
        self.tsc_deadline_ns: int | None = None
        self.pending_nmi = 0
        self.pending_init = 0

    # -- state queries -------------------------------------------------------------------------
    @property
    def software_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    def ppr(self) -> int:
        isrv = _highest(self.isr)
        if isrv < 0:
            isrv = 0
        if (self.tpr >> 4) >= (isrv >> 4):
            return self.tpr & 0xFF
        return isrv & 0xF0

    def highest_deliverable(self) -> int:
        """The vector the CPU would take now, or -1."""
        if not self.irr or not self.software_enabled:
            return -1
        v = _highest(self.irr)
        if (v & 0xF0) <= (self.ppr() & 0xF0):
            return -1
        return v

    def extint_enabled(self) -> bool:
        """Whether LINT0 passes the 8259's output to the CPU (virtual wire mode)."""
        lvt0 = self.lvt[Reg.LVT_LINT0]
        return not lvt0 & LVT_MASKED and ((lvt0 >> 8) & 7) == DeliveryMode.EXTINT

    def match_destination(self, dest: int, logical: bool) -> bool:
        if logical:
            if dest == 0xFF:
                return True
            ldr = (self.ldr >> 24) & 0xFF
            if (self.dfr >> 28) == 0xF:            # flat model
                return bool(ldr & dest)
            return (dest >> 4) == (ldr >> 4) and bool(dest & ldr & 0xF)   # cluster model
        return dest in (0xFF, self.apic_id)

    # -- interrupt flow ------------------------------------------------------------------------
    def accept(self, vector: int, level: bool = False) -> None:
        """An interrupt arrives (from the I/O APIC, an IPI, or a local source)."""
        if vector < 16:
            self.esr |= 1 << 6                     # received illegal vector
            return
        bit = 1 << vector
        self.irr |= bit
        if level:
            self.tmr |= bit
        else:
            self.tmr &= ~bit
        self._on_change()

    def ack(self) -> int:
        """Interrupt acknowledge: move the best IRR vector to the ISR; -1 if none is deliverable."""
        v = self.highest_deliverable()
        if v < 0:
            return -1
        self.irr &= ~(1 << v)
        self.isr |= 1 << v
        self._on_change()
        return v

    def eoi(self) -> None:
        v = _highest(self.isr)
        if v < 0:
            return
        self.isr &= ~(1 << v)
        if self.tmr & (1 << v) and not self.svr & SVR_SUPPRESS_EOI_BROADCAST:
            self._eoi_broadcast(v)
        self._on_change()

    def local_interrupt(self, reg: Reg) -> None:
        """An LVT source fires (timer, error, LINT1 as fixed)."""
        lvt = self.lvt[reg]
        if lvt & LVT_MASKED or not self.software_enabled:
            return
        mode = (lvt >> 8) & 7
        if mode == DeliveryMode.FIXED:
            self.accept(lvt & 0xFF, bool(lvt & LVT_LEVEL) and reg in (Reg.LVT_LINT0, Reg.LVT_LINT1))
        elif mode == DeliveryMode.NMI:
            self.pending_nmi += 1
            self._on_change()

    # -- timer ---------------------------------------------------------------------------------
    def _divide(self) -> int:
        v = (self.tdcr & 3) | ((self.tdcr >> 1) & 4)
        return 1 << ((v + 1) & 7)

    def _timer_mode(self) -> int:
        return (self.lvt[Reg.LVT_TIMER] >> 17) & 3

    def _period_ns(self) -> int:
        return max(1, self.tmict * self._divide() * NS // self.bus_hz)

    def current_count(self, now: int | None = None) -> int:
        if self.tmict == 0 or self._timer_mode() == TIMER_TSC_DEADLINE:
            return 0
        now = self._clock() if now is None else now
        ticks = (now - self.timer_start_ns) * self.bus_hz // (NS * self._divide())
        if self._timer_mode() == TIMER_PERIODIC:
            return self.tmict - (ticks % self.tmict)
        return max(0, self.tmict - ticks)

    def set_tsc_deadline(self, deadline_ns: int | None) -> None:
        """The CPU wrote IA32_TSC_DEADLINE (converted to host time); 0/None disarms."""
        self.tsc_deadline_ns = deadline_ns
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            self._arm_timer()

    def _arm_timer(self, now: int | None = None) -> None:
        """(Re)schedule the timer; ``now`` is the time of a TMICT write that starts a new count.

        A one-shot count that already ran out is not re-armed by TDCR/LVT changes, but a fresh
        TMICT write always schedules ``start + period`` (a deadline already past fires at once):
        reading the clock again here would drop periods shorter than the Python overhead.
        """
        if self._timer is not None:
            self._sched.cancel(self._timer)
            self._timer = None
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            if self.tsc_deadline_ns is not None:
                self._timer = self._sched.schedule(self.tsc_deadline_ns, self._timer_expired)
            return
        if self.tmict == 0:
            return
        if now is None:
            now = self._clock()
        period = self._period_ns()
        elapsed = now - self.timer_start_ns
        if self._timer_mode() == TIMER_PERIODIC:
            n = elapsed // period + 1
            when = self.timer_start_ns + n * period
        else:
            if elapsed >= period:
                return
            when = self.timer_start_ns + period
        self._timer = self._sched.schedule(when, self._timer_expired)

    def _timer_expired(self) -> None:
        self._timer = None
        self.timer_fired += 1
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            self.tsc_deadline_ns = None        # one shot per write, as on hardware
        self.local_interrupt(Reg.LVT_TIMER)
        if self._timer_mode() == TIMER_PERIODIC:
            self._arm_timer()

    # -- MMIO ----------------------------------------------------------------------------------
    def read_reg(self, reg: int) -> int:
        if reg == Reg.ID:
            return self.apic_id << 24
        if reg == Reg.VERSION:
            return VERSION
        if reg == Reg.TPR:
            return self.tpr
        if reg == Reg.APR:
            return 0
        if reg == Reg.PPR:
            return self.ppr()
        if reg == Reg.LDR:
            return self.ldr
        if reg == Reg.DFR:
            return self.dfr
        if reg == Reg.SVR:
            return self.svr
        if Reg.ISR0 <= reg < Reg.ISR0 + 0x80:
            return (self.isr >> (32 * ((reg - Reg.ISR0) >> 4))) & 0xFFFFFFFF
        if Reg.TMR0 <= reg < Reg.TMR0 + 0x80:
            return (self.tmr >> (32 * ((reg - Reg.TMR0) >> 4))) & 0xFFFFFFFF
        if Reg.IRR0 <= reg < Reg.IRR0 + 0x80:
            return (self.irr >> (32 * ((reg - Reg.IRR0) >> 4))) & 0xFFFFFFFF
        if reg == Reg.ESR:
            return self.esr
        if reg == Reg.ICR_LO:
            return self.icr_lo & ~(1 << 12)        # delivery status: idle
        if reg == Reg.ICR_HI:
            return self.icr_hi
        if reg in self.lvt:
            return self.lvt[reg]
        if reg == Reg.TMICT:
            return self.tmict
        if reg == Reg.TMCCT:
            return self.current_count()
        if reg == Reg.TDCR:
            return self.tdcr
        return 0

    def write_reg(self, reg: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if reg == Reg.TPR:
            self.tpr = value & 0xFF
            self._on_change()
        elif reg == Reg.EOI:
            self.eoi()
        elif reg == Reg.LDR:
            self.ldr = value & 0xFF000000
        elif reg == Reg.DFR:
            self.dfr = value | 0x0FFFFFFF
        elif reg == Reg.SVR:
            self.svr = value & 0x11FF
            if not self.svr & SVR_ENABLE:
                for r in self.lvt:
                    self.lvt[r] |= LVT_MASKED
            self._on_change()
        elif reg == Reg.ESR:
            self.esr = 0
        elif reg == Reg.ICR_HI:
            self.icr_hi = value & 0xFF000000
        elif reg == Reg.ICR_LO:
            self.icr_lo = value & 0x000CCFFF
            self._send_ipi(self, self.icr_lo, self.icr_hi)
        elif reg in self.lvt:
            if not self.software_enabled:
                value |= LVT_MASKED
            old_mode = self._timer_mode()
            self.lvt[reg] = value & 0x000717FF if reg == Reg.LVT_TIMER else value & 0x0001F7FF
            if reg == Reg.LVT_TIMER and self._timer_mode() != old_mode:
                self._arm_timer()
            if reg == Reg.LVT_LINT0:
                self._on_change()
        elif reg == Reg.TMICT:
            self.tmict = value
            self.timer_start_ns = self._clock()
            self._arm_timer(now=self.timer_start_ns)
        elif reg == Reg.TDCR:
            self.tdcr = value & 0xB
            self._arm_timer()

    def io_read(self, offset: int, size: int) -> int:
        reg = offset & 0xFF0
        value = self.read_reg(reg)
        shift = 8 * (offset & 3)
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset & 0xF:
            return                                 # only aligned 32-bit accesses reach registers
        self.write_reg(offset & 0xFF0, value)
