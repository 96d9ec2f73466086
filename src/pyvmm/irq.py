"""Interrupt lines.

Devices hold :class:`IrqLine` objects and only ever raise, lower or pulse
them.  Behind a line is an :class:`InterruptSink`, provided by whoever owns
the interrupt controllers: the in-kernel irqchip on KVM (KVM_IRQ_LINE), or a
userspace PIC/IOAPIC model on tcg.  A device never knows which.
"""

from __future__ import annotations

import threading
from typing import Protocol


class InterruptSink(Protocol):
    """Receives level changes for a global system interrupt (GSI) number."""

    def set_irq(self, gsi: int, level: bool) -> None: ...


class IrqLine:
    """One interrupt line from a device to a GSI."""

    __slots__ = ("gsi", "_sink", "_level", "_lock")

    def __init__(self, sink: InterruptSink, gsi: int) -> None:
        self.gsi = gsi
        self._sink = sink
        self._level = False
        self._lock = threading.Lock()

    @property
    def level(self) -> bool:
        return self._level

    def set_level(self, level: bool) -> None:
        with self._lock:
            if level == self._level:
                return
            self._level = level
            self._sink.set_irq(self.gsi, level)

    def raise_(self) -> None:
        self.set_level(True)

    def lower(self) -> None:
        self.set_level(False)

    def pulse(self) -> None:
        """An edge: raise then lower (for edge-triggered ISA interrupts)."""
        with self._lock:
            self._sink.set_irq(self.gsi, True)
            self._sink.set_irq(self.gsi, False)
            self._level = False


class IrqRouter:
    """Hands out lines for GSIs on one sink.  The sink can be swapped on machine reset."""

    def __init__(self) -> None:
        self._sink: InterruptSink | None = None
        self._lines: dict[int, IrqLine] = {}

    def attach(self, sink: InterruptSink) -> None:
        self._sink = sink
        for line in self._lines.values():
            line._level = False

    def set_irq(self, gsi: int, level: bool) -> None:
        if self._sink is not None:
            self._sink.set_irq(gsi, level)

    def line(self, gsi: int) -> IrqLine:
        if gsi not in self._lines:
            self._lines[gsi] = IrqLine(self, gsi)
        return self._lines[gsi]
