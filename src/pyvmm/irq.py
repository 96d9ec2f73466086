"""Interrupt lines.

Devices hold :class:`IrqLine` objects and only ever raise, lower or pulse
them.  Behind a line is an :class:`InterruptSink`, provided by whoever owns
the interrupt controllers: the in-kernel irqchip on KVM (KVM_IRQ_LINE), or a
userspace PIC/IOAPIC model on tcg.  A device never knows which.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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


class CpuPort(Protocol):
    """A userspace interrupt controller's view of one software vCPU (tcg)."""

    def set_intr(self, level: bool) -> None:
        """INTR is asserted (an interrupt is ready to be taken) or not."""
        ...

    def raise_nmi(self) -> None:
        """Deliver an NMI (edge; the CPU masks further NMIs until its IRET)."""
        ...

    def init_ipi(self) -> None:
        """An INIT IPI reached this CPU: it parks until a Startup IPI."""
        ...

    def startup_ipi(self, vector: int) -> None:
        """A Startup IPI: start in real mode at ``vector << 12``."""
        ...


class CpuInterruptController(InterruptSink, Protocol):
    """What a software CPU needs of interrupt controllers living in userspace.

    The machine builder creates them (:class:`pyvmm.devices.irqchip.UserspaceIrqchip`)
    and hands them to an accelerator without in-kernel ones, so the accelerator
    never imports a device model.
    """

    def attach_cpu(self, index: int, port: CpuPort) -> None: ...

    def bind_current_cpu(self, index: int) -> None:
        """Called on each vCPU thread, so its LAPIC accesses reach its own LAPIC."""
        ...

    def ack(self, index: int) -> int:
        """CPU ``index`` takes the pending interrupt: returns its vector."""
        ...

    def set_tsc_deadline(self, index: int, deadline_ns: int | None) -> None: ...

    def set_apic_global_enable(self, index: int, enabled: bool) -> None: ...

    def start(self) -> None:
        """Start the timers."""
        ...

    def stop(self) -> None: ...

    def reset(self) -> None: ...


#: ``factory(ncpus, lapic_bus_hz)``: the builder's way to give an accelerator userspace interrupt controllers.
IrqchipFactory = Callable[[int, int], CpuInterruptController]
