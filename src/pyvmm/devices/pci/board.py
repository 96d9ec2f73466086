"""PCI on the PC machine: the host bridge and the virtio-pci transports plugged into it.

The machine creates one :class:`PciBoard` (always: a PC has a PCI bus, and
Linux looks for one), plugs the virtio devices that ``-device *-pci`` made
(:mod:`pyvmm.qdev` builds them), passes :meth:`PciBoard.acpi`
to ``build_acpi(pci=...)`` and calls :meth:`PciBoard.firmware_setup` before
each boot (BAR assignment, as a BIOS would do).

MSI-X is advertised only when the machine gives an MSI sender (KVM's
``signal_msi``); otherwise virtio-pci devices use INTx, which Linux handles
the same way minus per-queue vectors.  Device back-ends run on the virtio
iothread the caller provides (``loop()``), shared with virtio-mmio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyvmm.bus import Bus
from pyvmm.capabilities import AccelCapabilities
from pyvmm.devices.pci.host import DEFAULT_WINDOWS, LevelLine, PciHost
from pyvmm.devices.pci.msix import MsiSender
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.pci import VirtioPci
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.x86.acpi import AcpiPciHost

log = logging.getLogger(__name__)


class PciBoard:
    """Owns the PCI host and the PCI devices/back-ends of one machine."""

    def __init__(self, memory: GuestMemory, mmio_bus: Bus, io_bus: Bus, irq_line: Callable[[int], LevelLine],
                 loop: Callable[[], MainLoop], *, msi_sender: MsiSender | None = None,
                 windows: AcpiPciHost = DEFAULT_WINDOWS) -> None:
        self.memory = memory
        self.host = PciHost(memory, mmio_bus, io_bus, irq_line, windows=windows, msi_sender=msi_sender)
        self._loop = loop

    # -- configuration ----------------------------------------------------------------------------------
    def plug(self, dev: VirtioDevice, slot: int | None = None) -> VirtioPci:
        host = self.host
        try:
            t = VirtioPci(dev, msix=host.msi_capable, msi_sender=host.send_msi if host.msi_capable else None)
            host.add(t, slot)
        except Exception:
            dev.close()
            raise
        return t

    # -- machine hooks -----------------------------------------------------------------------------------
    def acpi(self) -> AcpiPciHost:
        return self.host.windows

    def firmware_setup(self) -> None:
        """Assign BARs and enable decoding (before each boot; reset clears them)."""
        self.host.assign_resources()

    def attach_capabilities(self, caps: AccelCapabilities) -> None:
        """Use the accelerator's fast paths (once, after the devices are added).

        Notify writes of virtio-pci devices go to ioeventfds where the accelerator has them;
        where it needs to hear of DMA (tcg), every virtio device tells it what it wrote.
        """
        for dev in self.host.devices.values():
            if not isinstance(dev, VirtioPci):
                continue
            if caps.dma_written is not None:
                dev.device.set_dma_hook(caps.dma_written)
            if caps.ioeventfd is not None:
                dev.attach_ioeventfds(caps.ioeventfd, self._loop())
            if caps.msi_irqfd is not None:
                dev.attach_msi_irqfds(caps.msi_irqfd)

    def reset(self) -> None:
        self.host.reset()

    def close(self) -> None:
        self.host.close()

