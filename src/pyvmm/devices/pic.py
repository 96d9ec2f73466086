"""The PC's two cascaded Intel 8259A programmable interrupt controllers.

Used by the tcg accelerator's userspace irqchip (on KVM the kernel models
them).  The slave's output is wired to the master's IRQ2.  Each chip keeps
IRR/ISR/IMR, a rotating priority base, the ICW1-4 initialization sequence,
OCW2 end-of-interrupt/rotation commands, OCW3 register reads and poll mode,
and an edge/level control register (ELCR, ports 0x4d0/0x4d1).

The pair does not know about CPUs: it reports changes of its INT output to a
callback, and the CPU side acknowledges with :meth:`PicPair.intack`.
Locking is the caller's job (the irqchip holds one lock around all of it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

CASCADE_IRQ = 2
# Bits of the ELCR that may be set: IRQ0/1/2 (master) and IRQ8/13 (slave) are always edge.
ELCR_MASK = (0xF8, 0xDE)


@dataclass
class Pic8259:
    """One 8259A chip."""

    is_master: bool
    irr: int = 0
    imr: int = 0
    isr: int = 0
    priority_add: int = 0
    irq_base: int = 0
    read_reg_select: int = 0
    poll: bool = False
    special_mask: bool = False
    init_state: int = 0
    auto_eoi: bool = False
    rotate_on_auto_eoi: bool = False
    special_fully_nested: bool = False
    init4: bool = False
    single_mode: bool = False
    elcr: int = 0
    last_irr: int = 0   # input levels, for edge detection

    @property
    def elcr_mask(self) -> int:
        return ELCR_MASK[0] if self.is_master else ELCR_MASK[1]

    def init_reset(self) -> None:
        """The state ICW1 (and power-on) leaves the chip in; the ELCR survives."""
        self.irr = self.imr = self.isr = 0
        self.priority_add = 0
        self.irq_base = 0
        self.read_reg_select = 0
        self.poll = self.special_mask = False
        self.init_state = 0
        self.auto_eoi = self.rotate_on_auto_eoi = self.special_fully_nested = False
        self.init4 = self.single_mode = False
        self.last_irr = 0

    def set_input(self, irq: int, level: bool) -> None:
        mask = 1 << irq
        if self.elcr & mask:
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:
            if not self.last_irr & mask:
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask

    def _priority(self, mask: int) -> int:
        """Priority (0 = highest) of the best bit in ``mask`` relative to the rotation; 8 if none."""
        if mask == 0:
            return 8
        p = 0
        while not mask & (1 << ((p + self.priority_add) & 7)):
            p += 1
        return p

    def pending_irq(self) -> int:
        """The IRQ this chip would present to the CPU now, or -1."""
        p = self._priority(self.irr & ~self.imr)
        if p == 8:
            return -1
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested and self.is_master:
            in_service &= ~(1 << CASCADE_IRQ)
        if p < self._priority(in_service):
            return (p + self.priority_add) & 7
        return -1

    def intack(self, irq: int) -> None:
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        if not self.elcr & (1 << irq):
            self.irr &= ~(1 << irq)

    # -- port interface ------------------------------------------------------------------------
    def write(self, addr: int, val: int) -> None:
        val &= 0xFF
        if addr == 0:
            if val & 0x10:                      # ICW1
                self.init_reset()
                self.init_state = 1
                self.init4 = bool(val & 1)
                self.single_mode = bool(val & 2)
            elif val & 0x08:                    # OCW3
                if val & 0x04:
                    self.poll = True
                if val & 0x02:
                    self.read_reg_select = val & 1
                if val & 0x40:
                    self.special_mask = bool((val >> 5) & 1)
            else:                               # OCW2
                cmd = val >> 5
                if cmd in (0, 4):
                    self.rotate_on_auto_eoi = cmd == 4
                elif cmd in (1, 5):             # non-specific EOI (with rotation)
                    p = self._priority(self.isr)
                    if p != 8:
                        irq = (p + self.priority_add) & 7
                        self.isr &= ~(1 << irq)
                        if cmd == 5:
                            self.priority_add = (irq + 1) & 7
                elif cmd == 3:                  # specific EOI
                    self.isr &= ~(1 << (val & 7))
                elif cmd == 6:                  # set priority
                    self.priority_add = (val + 1) & 7
                elif cmd == 7:                  # rotate on specific EOI
                    irq = val & 7
                    self.isr &= ~(1 << irq)
                    self.priority_add = (irq + 1) & 7
            return
        if self.init_state == 0:                # OCW1
            self.imr = val
        elif self.init_state == 1:              # ICW2
            self.irq_base = val & 0xF8
            self.init_state = (4 if self.init4 else 0) if self.single_mode else 2
        elif self.init_state == 2:              # ICW3
            self.init_state = 3 if self.init4 else 0
        elif self.init_state == 3:              # ICW4
            self.special_fully_nested = bool((val >> 4) & 1)
            self.auto_eoi = bool((val >> 1) & 1)
            self.init_state = 0
        else:
            self.init_state = 0

    def read(self, addr: int) -> int:
        if self.poll:
            self.poll = False
            irq = self.pending_irq()
            if irq >= 0:
                self.intack(irq)
                return irq | 0x80
            return 0
        if addr == 0:
            return self.isr if self.read_reg_select else self.irr
        return self.imr


class PicPair:
    """Master + slave 8259A; ``on_output(level)`` is told when the master's INT output changes."""

    def __init__(self, on_output: Callable[[bool], None]) -> None:
        self.master = Pic8259(is_master=True)
        self.slave = Pic8259(is_master=False)
        self._on_output = on_output
        self.output = False
        self.spurious = 0
        self.reset()

    def reset(self) -> None:
        """Power-on state as PC firmware leaves it: vectors 0x08/0x70, every input masked.

        Without firmware (direct kernel boot) an uninitialized 8259 would present
        IRQ0 as vector 0 the moment the guest enables interrupts.
        """
        for chip, base in ((self.master, 0x08), (self.slave, 0x70)):
            chip.init_reset()
            chip.elcr = 0
            chip.irq_base = base
            chip.imr = 0xFF
        self._update()

    def _update(self) -> None:
        # The slave's INT output is a level on the master's IR2.
        if self.slave.pending_irq() >= 0:
            self.master.irr |= 1 << CASCADE_IRQ
        else:
            self.master.irr &= ~(1 << CASCADE_IRQ)
        out = self.master.pending_irq() >= 0
        if out != self.output:
            self.output = out
            self._on_output(out)

    def set_irq(self, irq: int, level: bool) -> None:
        """Input line ``irq`` (0-15) changed level."""
        if not 0 <= irq < 16:
            return
        if irq < 8:
            self.master.set_input(irq, level)
        else:
            self.slave.set_input(irq - 8, level)
        self._update()

    def intack(self) -> int:
        """The CPU's interrupt acknowledge cycle: returns the vector (spurious IRQ7/15 if none)."""
        irq = self.master.pending_irq()
        if irq >= 0:
            self.master.intack(irq)
            if irq == CASCADE_IRQ:
                irq2 = self.slave.pending_irq()
                if irq2 >= 0:
                    self.slave.intack(irq2)
                else:
                    irq2 = 7
                    self.spurious += 1
                vector = self.slave.irq_base + irq2
            else:
                vector = self.master.irq_base + irq
        else:
            self.spurious += 1
            vector = self.master.irq_base + 7
        self._update()
        return vector

    # -- bus devices ---------------------------------------------------------------------------
    def chip_device(self, master: bool) -> _ChipPorts:
        return _ChipPorts(self, self.master if master else self.slave)

    def elcr_device(self) -> _ElcrPorts:
        return _ElcrPorts(self)


class _ChipPorts:
    """Ports base+0 (command) and base+1 (data) of one chip."""

    def __init__(self, pair: PicPair, chip: Pic8259) -> None:
        self.pair = pair
        self.chip = chip

    def io_read(self, offset: int, size: int) -> int:
        v = self.chip.read(offset & 1)
        self.pair._update()   # a poll-mode read acknowledges
        return v

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.chip.write(offset & 1, value)
        self.pair._update()


class _ElcrPorts:
    """Ports 0x4d0 (master ELCR) and 0x4d1 (slave ELCR)."""

    def __init__(self, pair: PicPair) -> None:
        self.pair = pair

    def io_read(self, offset: int, size: int) -> int:
        chip = self.pair.master if offset == 0 else self.pair.slave
        return chip.elcr

    def io_write(self, offset: int, size: int, value: int) -> None:
        chip = self.pair.master if offset == 0 else self.pair.slave
        chip.elcr = value & chip.elcr_mask
        self.pair._update()
