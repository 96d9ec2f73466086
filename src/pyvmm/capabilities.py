"""What an accelerator can do for devices, as narrow interfaces.

Devices never ask which accelerator runs the CPU.  The machine builder asks
the accelerator for its :class:`AccelCapabilities` and hands each device the
pieces it uses; a piece the accelerator lacks is ``None`` and the device falls
back to the slow path (an exit to userspace, an :class:`~pyvmm.irq.IrqLine`).

* :class:`IoEventFds`: a guest write to an address signals an eventfd in the
  kernel, with no exit to userspace (KVM_IOEVENTFD).
* :class:`IrqFds`: signalling an eventfd raises a GSI in the kernel's
  irqchip (KVM_IRQFD), with a resample eventfd for level-triggered lines.
* :class:`MsiIrqFds`: signalling an eventfd delivers one MSI in the kernel (an MSI route plus
  KVM_IRQFD), so a vhost-user back end interrupts the guest with no trip through the VMM.
* :class:`MsiSink`: deliver one message-signalled interrupt (KVM_SIGNAL_MSI,
  or the userspace irqchip's APIC bus).
* :class:`DmaObserver`: "guest RAM in this range was written by a device",
  which a software CPU needs to drop translated code (tcg).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class IoEventFds(Protocol):
    def register_ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool,
                           datamatch: int | None = None) -> None:
        """Signal ``fd`` when the guest writes ``length`` bytes at ``addr`` (port I/O if ``pio``)."""
        ...

    def unregister_ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool,
                             datamatch: int | None = None) -> None: ...


class IrqFds(Protocol):
    def register_irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None) -> None:
        """Raise ``gsi`` when ``fd`` is signalled; for a level line the kernel signals ``resample_fd`` at EOI."""
        ...

    def unregister_irqfd(self, fd: int, gsi: int) -> None: ...


class MsiIrqFds(Protocol):
    def register_msi_irqfd(self, fd: int, address: int, data: int) -> None:
        """Deliver the MSI ``address``/``data`` whenever ``fd`` is signalled (again: a new message).

        Raises :class:`~pyvmm.errors.PyvmmError` if the kernel refuses; the caller then relays.
        """
        ...

    def unregister_msi_irqfd(self, fd: int) -> None: ...


class MsiSink(Protocol):
    def __call__(self, address: int, data: int) -> None:
        """Deliver one MSI (x86 format: address 0xFEExxxxx, data with vector and delivery mode)."""
        ...


class DmaObserver(Protocol):
    def __call__(self, gpa: int, length: int) -> None:
        """Guest RAM ``[gpa, gpa + length)`` was just written by a device."""
        ...


@dataclass(frozen=True)
class AccelCapabilities:
    """The fast paths one accelerator offers; ``None`` where it has none."""

    ioeventfd: IoEventFds | None = None
    irqfd: IrqFds | None = None
    msi: MsiSink | None = None
    msi_irqfd: MsiIrqFds | None = None
    dma_written: DmaObserver | None = None


__all__ = ["AccelCapabilities", "DmaObserver", "IoEventFds", "IrqFds", "MsiIrqFds", "MsiSink"]
