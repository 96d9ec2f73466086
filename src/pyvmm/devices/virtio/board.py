"""Placing virtio-mmio transports on the PC machine: windows, interrupts, iothread, ACPI, KVM fast paths.

Windows are 0x200 bytes each from :data:`MMIO_BASE` (in the 32-bit hole just
below the I/O APIC, as QEMU's microvm places them), at most :data:`MAX_DEVICES`.
Interrupts use :data:`MMIO_GSIS` (I/O APIC pins 20-23, declared level-triggered
active-high in the DSDT; PCI INTx takes 16-19) round-robin: devices 4-7 share a
pin with devices 0-3.  Sharing a level-triggered line is safe because Linux's
virtio_mmio requests it IRQF_SHARED and the line is a wired OR
(:class:`WiredOr` here; on KVM each device has its own irqfd on the GSI and the
kernel ORs them).  The guest finds them through ACPI
(``LNRO0005``), so no kernel command-line options are needed.

All virtio back-ends run on one iothread (``virtio-io``) created on first
use; character back-ends keep using the machine's main loop.  Where the
accelerator has them (KVM), :meth:`VirtioMmioBoard.attach_capabilities` registers an ioeventfd per queue
(``QueueNotify`` write with ``datamatch = queue``), so a kick signals the
iothread without a userspace exit.  Interrupts use the machine's IrqLine
(KVM_IRQ_LINE / the userspace IOAPIC).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pyvmm.bus import Bus
from pyvmm.capabilities import AccelCapabilities
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.mmio import MMIO_SIZE, NOTIFY_OFFSET, EventfdIrqLine, VirtioMmio
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.irq import IrqLine
from pyvmm.loop import IOThread, MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.acpi import AcpiMmioDevice

log = logging.getLogger(__name__)

MMIO_BASE = layout.VIRTIO_MMIO_BASE
MMIO_GSIS = layout.VIRTIO_MMIO_GSIS
MAX_DEVICES = layout.VIRTIO_MMIO_MAX_DEVICES


class WiredOr:
    """Several level-triggered sources on one interrupt line: high while any source is high."""

    def __init__(self, line: IrqLine) -> None:
        self._line = line
        self._levels: list[bool] = []
        self._lock = threading.Lock()

    def source(self) -> _OrInput:
        with self._lock:
            self._levels.append(False)
            return _OrInput(self, len(self._levels) - 1)

    def _set(self, index: int, level: bool) -> None:
        with self._lock:
            self._levels[index] = level
            self._line.set_level(any(self._levels))


class _OrInput:
    """One input of a :class:`WiredOr` (what a transport drives)."""

    __slots__ = ("_or", "_index")

    def __init__(self, wired: WiredOr, index: int) -> None:
        self._or = wired
        self._index = index

    def set_level(self, level: bool) -> None:
        self._or._set(self._index, level)


class VirtioMmioBoard:
    """Owns the virtio-mmio transports of one machine."""

    def __init__(self, memory: GuestMemory, mmio_bus: Bus, irq_line: Callable[[int], IrqLine],
                 base: int = MMIO_BASE, gsis: tuple[int, ...] = MMIO_GSIS) -> None:
        self.memory = memory
        self.mmio_bus = mmio_bus
        self.irq_line = irq_line
        self.base = base
        self.gsis = gsis
        self.transports: list[tuple[VirtioMmio, int, int]] = []  # (transport, base, gsi)
        self._iothread: IOThread | None = None
        self._irqfd_lines: dict[int, EventfdIrqLine] = {}
        self._wired: dict[int, WiredOr] = {}
        self._sources: list[_OrInput] = []  # per transport: its input of the GSI's wired OR

    # -- placement ------------------------------------------------------------------------------
    @property
    def loop(self) -> MainLoop:
        if self._iothread is None:
            self._iothread = IOThread("virtio-io")
        return self._iothread.loop

    def add(self, device: VirtioDevice) -> VirtioMmio:
        slot = len(self.transports)
        if slot >= MAX_DEVICES:
            device.close()
            raise ConfigError(f"too many virtio-mmio devices (at most {MAX_DEVICES})")
        base, gsi = self.base + slot * MMIO_SIZE, self.gsis[slot % len(self.gsis)]
        if gsi not in self._wired:
            self._wired[gsi] = WiredOr(self.irq_line(gsi))
        source = self._wired[gsi].source()
        self._sources.append(source)
        t = VirtioMmio(device, source)
        self.mmio_bus.register(base, MMIO_SIZE, t, f"virtio-mmio{slot}:{device.name}")
        self.transports.append((t, base, gsi))
        log.debug("%s at %#x gsi %d", device.name, base, gsi)
        return t

    def acpi_devices(self) -> list[AcpiMmioDevice]:
        return [AcpiMmioDevice(f"VR{i:02X}", "LNRO0005", uid=i, mmio_base=base, mmio_size=MMIO_SIZE,
                               gsi=gsi, level=True)
                for i, (_t, base, gsi) in enumerate(self.transports)]

    # -- accelerator fast paths -------------------------------------------------------------------
    def attach_capabilities(self, caps: AccelCapabilities) -> None:
        """Use the accelerator's fast paths (once, after the devices are added).

        With an ioeventfd capability each queue's kick signals an eventfd; with irqfd each
        device raises its GSI through an eventfd (the kernel ORs the shared lines).  If the
        kernel refuses an irqfd (no resample support), that device keeps its IrqLine.  A DMA
        observer (tcg) hears of every device write to guest RAM.
        """
        for i, (t, base, gsi) in enumerate(self.transports):
            if caps.dma_written is not None:
                t.device.set_dma_hook(caps.dma_written)
            if caps.ioeventfd is not None:
                for q in range(len(t.device.queues)):
                    fd = t.notify_eventfd(q, self.loop)
                    caps.ioeventfd.register_ioeventfd(fd, base + NOTIFY_OFFSET, 4, pio=False, datamatch=q)
            if caps.irqfd is None:
                continue
            line = self._irqfd_lines.get(i) or EventfdIrqLine(self.loop)
            try:
                caps.irqfd.register_irqfd(line.irqfd, gsi, resample_fd=line.resample_fd)
            except PyvmmError as e:
                log.info("virtio: no irqfd for gsi %d (%s); using KVM_IRQ_LINE", gsi, e)
                if i not in self._irqfd_lines:
                    line.close()
                t.set_irq_line(self._sources[i])
                continue
            self._irqfd_lines[i] = line
            t.set_irq_line(line)

    # -- life cycle -------------------------------------------------------------------------------
    def reset(self) -> None:
        for t, _, _ in self.transports:
            t.reset()

    def close(self) -> None:
        # Stop the iothread first so no queue handler runs while back-ends are closed.
        if self._iothread is not None:
            self._iothread.stop()
            self._iothread = None
        for t, _, _ in self.transports:
            try:
                t.close()
            except OSError as e:
                log.debug("closing %s: %s", t.device.name, e)
        for line in self._irqfd_lines.values():
            line.close()
        self._irqfd_lines.clear()

