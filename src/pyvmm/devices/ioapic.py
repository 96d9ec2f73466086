"""82093AA-style I/O APIC (MMIO at 0xfec00000, 24 pins) for the userspace irqchip.

Indirect register access through IOREGSEL (offset 0x00) and IOWIN (0x10):
ID, version, arbitration, and 24 64-bit redirection entries.  Edge pins
deliver on a rising edge; level pins deliver while asserted and set Remote
IRR until the local APIC broadcasts an EOI for the vector.  Delivery is a
callback (``deliver(vector, delivery_mode, dest, logical, level)``); the
irqchip routes it to local APICs.  No locking here; the irqchip wraps it.
"""

from __future__ import annotations

from collections.abc import Callable

NUM_PINS = 24
VERSION = 0x11

REDIR_MASKED = 1 << 16
REDIR_LEVEL = 1 << 15
REDIR_REMOTE_IRR = 1 << 14
REDIR_POLARITY_LOW = 1 << 13
REDIR_DELIVERY_STATUS = 1 << 12
REDIR_DEST_LOGICAL = 1 << 11
# Bits the guest may write (remote IRR and delivery status are read-only).
REDIR_WRITABLE = 0xFF000000_0001AFFF


class IoApic:
    def __init__(self, ioapic_id: int,
                 deliver: Callable[[int, int, int, bool, bool], None]) -> None:
        self._deliver = deliver
        self.default_id = ioapic_id
        self.reset()

    def reset(self) -> None:
        self.id = self.default_id
        self.ioregsel = 0
        self.irr = 0                      # current pin levels (after polarity)
        self.redir = [REDIR_MASKED] * NUM_PINS
        self.delivered = 0

    # -- pins ----------------------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        if not 0 <= pin < NUM_PINS:
            return
        bit = 1 << pin
        entry = self.redir[pin]
        if entry & REDIR_LEVEL:
            if level:
                self.irr |= bit
                self._service(pin)
            else:
                self.irr &= ~bit
        else:
            rising = level and not self.irr & bit
            if level:
                self.irr |= bit
            else:
                self.irr &= ~bit
            if rising:
                self._service(pin)

    def _service(self, pin: int) -> None:
        entry = self.redir[pin]
        if entry & REDIR_MASKED:
            return
        level = bool(entry & REDIR_LEVEL)
        if level:
            if entry & REDIR_REMOTE_IRR:
                return
            self.redir[pin] = entry | REDIR_REMOTE_IRR
        self.delivered += 1
        self._deliver(entry & 0xFF, (entry >> 8) & 7, (entry >> 56) & 0xFF,
                      bool(entry & REDIR_DEST_LOGICAL), level)

    def eoi(self, vector: int) -> None:
        """A local APIC EOIed level-triggered ``vector``: clear Remote IRR, re-deliver if still asserted."""
        for pin in range(NUM_PINS):
            entry = self.redir[pin]
            if (entry & 0xFF) == vector and entry & REDIR_REMOTE_IRR:
                self.redir[pin] = entry & ~REDIR_REMOTE_IRR
                if self.irr & (1 << pin) and entry & REDIR_LEVEL:
                    self._service(pin)

    def pin_is_extint(self, pin: int) -> bool:
        entry = self.redir[pin]
        return not entry & REDIR_MASKED and ((entry >> 8) & 7) == 7

    # -- registers -----------------------------------------------------------------------------
    def read_reg(self, index: int) -> int:
        if index == 0:
            return (self.id & 0xF) << 24
        if index == 1:
            return ((NUM_PINS - 1) << 16) | VERSION
        if index == 2:
            return (self.id & 0xF) << 24
        if 0x10 <= index < 0x10 + 2 * NUM_PINS:
            pin, hi = divmod(index - 0x10, 2)
            entry = self.redir[pin]
            return (entry >> 32) & 0xFFFFFFFF if hi else entry & 0xFFFFFFFF
        return 0

    def write_reg(self, index: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if index == 0:
            self.id = (value >> 24) & 0xF
            return
        if 0x10 <= index < 0x10 + 2 * NUM_PINS:
            pin, hi = divmod(index - 0x10, 2)
            old = self.redir[pin]
            if hi:
                new = (old & 0xFFFFFFFF) | (value << 32)
            else:
                new = (old & ~0xFFFFFFFF) | value
            new = (new & REDIR_WRITABLE) | (old & (REDIR_REMOTE_IRR | REDIR_DELIVERY_STATUS))
            if not new & REDIR_LEVEL:
                new &= ~REDIR_REMOTE_IRR
            self.redir[pin] = new
            if new & REDIR_LEVEL and self.irr & (1 << pin) and not new & REDIR_MASKED:
                self._service(pin)

    def io_read(self, offset: int, size: int) -> int:
        if offset == 0x00:
            return self.ioregsel
        if offset == 0x10:
            return self.read_reg(self.ioregsel)
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x00:
            self.ioregsel = value & 0xFF
        elif offset == 0x10:
            self.write_reg(self.ioregsel, value)
        elif offset == 0x40:                       # EOI register (version 0x20 and later)
            self.eoi(value & 0xFF)
