"""The virtio-mmio transport, register layout version 2 (virtio 1.x section 4.2).

One :class:`VirtioMmio` wraps one :class:`~pyvmm.devices.virtio.device.VirtioDevice`
in a 0x200-byte MMIO window: common registers below 0x100, the device's
configuration space from 0x100.  The machine registers the window on the
MMIO bus and describes it to the guest through ACPI (``LNRO0005``) with a
level-triggered interrupt: the line is high while InterruptStatus is
non-zero.

Fast paths.  A QueueNotify write normally arrives as an MMIO exit on a vCPU
thread and is handed to the device (which posts it to its iothread).  When
the accelerator supports ioeventfd, the machine asks :meth:`notify_eventfd`
for an eventfd per queue and registers it for ``base + NOTIFY_OFFSET`` with
``datamatch=queue``; the kernel then signals the eventfd without leaving
KVM_RUN, and the device loop reads it.  Likewise :class:`EventfdIrqLine`
drives the interrupt through an irqfd with a resample fd (level semantics:
KVM drops the line at EOI and the resample callback raises it again while
InterruptStatus is still non-zero).

Threads: register accesses come from vCPU threads and take the device lock
for anything touching device state; the interrupt status has its own lock
(``_irq_lock``) so ISR reads and ACKs never wait for a queue handler.
"""

from __future__ import annotations

import logging
import os
import threading
from enum import IntEnum, IntFlag
from typing import Any, Protocol

from pyvmm.devices.virtio.device import Status, VirtioDevice
from pyvmm.loop import MainLoop
from pyvmm.vmstate import fields

log = logging.getLogger(__name__)

MMIO_SIZE = 0x200
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D565950  # "PYVM"
CONFIG_OFFSET = 0x100


class Reg(IntEnum):
    MAGIC = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    CONFIG_GENERATION = 0x0FC


NOTIFY_OFFSET = Reg.QUEUE_NOTIFY


class Isr(IntFlag):
    USED_BUFFER = 1
    CONFIG_CHANGE = 2


class LevelLine(Protocol):
    """An interrupt output with level semantics (pyvmm.irq.IrqLine or EventfdIrqLine)."""

    def set_level(self, level: bool) -> None: ...


_ADDR_REGS = {
    Reg.QUEUE_DESC_LOW: ("desc_addr", 0), Reg.QUEUE_DESC_HIGH: ("desc_addr", 32),
    Reg.QUEUE_DRIVER_LOW: ("avail_addr", 0), Reg.QUEUE_DRIVER_HIGH: ("avail_addr", 32),
    Reg.QUEUE_DEVICE_LOW: ("used_addr", 0), Reg.QUEUE_DEVICE_HIGH: ("used_addr", 32),
}


class VirtioMmio:
    """A virtio-mmio register window in front of one device."""

    def __init__(self, device: VirtioDevice, irq: LevelLine | None) -> None:
        self.device = device
        self.irq = irq
        self._irq_lock = threading.Lock()
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self._eventfds: dict[int, int] = {}
        self._eventfd_loop: MainLoop | None = None
        device.bind(self)

    # -- interrupts (VirtioInterrupt) ---------------------------------------------------------
    def queue_interrupt(self, queue: int) -> None:
        self._raise(Isr.USED_BUFFER)

    def config_interrupt(self) -> None:
        self._raise(Isr.CONFIG_CHANGE)

    def _raise(self, bits: int) -> None:
        with self._irq_lock:
            self.interrupt_status |= bits
            if self.irq is not None:
                self.irq.set_level(True)

    def _ack(self, bits: int) -> None:
        with self._irq_lock:
            self.interrupt_status &= ~bits
            if self.irq is not None:
                self.irq.set_level(self.interrupt_status != 0)

    def irq_pending(self) -> bool:
        return self.interrupt_status != 0

    def set_irq_line(self, line: LevelLine | None) -> None:
        """Switch the interrupt output (e.g. to an :class:`EventfdIrqLine` on KVM), keeping its level."""
        with self._irq_lock:
            old = self.irq
            self.irq = line
            if old is not None:
                old.set_level(False)
            if line is not None:
                line.set_level(self.interrupt_status != 0)

    # -- bus interface -------------------------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        dev = self.device
        if offset >= CONFIG_OFFSET:
            return dev.read_config(offset - CONFIG_OFFSET, size)
        if size != 4 or offset & 3:
            log.debug("%s: %d-byte read at %#x ignored", dev.name, size, offset)
            return 0
        if offset == Reg.MAGIC:
            return MAGIC
        if offset == Reg.VERSION:
            return VERSION
        if offset == Reg.DEVICE_ID:
            return dev.device_id
        if offset == Reg.VENDOR_ID:
            return VENDOR_ID
        if offset == Reg.INTERRUPT_STATUS:
            return self.interrupt_status
        if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        with dev.lock:
            if offset == Reg.DEVICE_FEATURES:
                return dev.device_feature_word(self.device_features_sel)
            if offset == Reg.STATUS:
                return dev.status
            if offset == Reg.CONFIG_GENERATION:
                return dev.config_generation
            q = dev.queues[self.queue_sel] if self.queue_sel < len(dev.queues) else None
            if offset == Reg.QUEUE_NUM_MAX:
                return q.max_size if q is not None else 0
            if q is None:
                return 0
            if offset == Reg.QUEUE_READY:
                return int(q.ready)
            if offset == Reg.QUEUE_NUM:
                return q.size
            reg = _ADDR_REGS.get(offset)  # type: ignore[call-overload]
            if reg is not None:
                attr, shift = reg
                return (getattr(q, attr) >> shift) & 0xFFFF_FFFF
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        dev = self.device
        if offset >= CONFIG_OFFSET:
            dev.write_config(offset - CONFIG_OFFSET, size, value)
            return
        if size != 4 or offset & 3:
            log.debug("%s: %d-byte write at %#x ignored", dev.name, size, offset)
            return
        value &= 0xFFFF_FFFF
        if offset == Reg.QUEUE_NOTIFY:
            dev.notify(value & 0xFFFF)
            return
        if offset == Reg.INTERRUPT_ACK:
            self._ack(value)
            return
        if offset == Reg.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
            return
        if offset == Reg.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
            return
        if offset == Reg.QUEUE_SEL:
            self.queue_sel = value
            return
        with dev.lock:
            if offset == Reg.DRIVER_FEATURES:
                dev.write_driver_features(self.driver_features_sel, value)
            elif offset == Reg.STATUS:
                dev.set_status(value)
                if value == 0:
                    self._reset_transport()
            elif self.queue_sel < len(dev.queues):
                self._queue_write(offset, value)

    def _queue_write(self, offset: int, value: int) -> None:
        dev = self.device
        q = dev.queues[self.queue_sel]
        if offset == Reg.QUEUE_READY:
            if value & 1 and not q.ready:
                dev.queue_ready(q.index)
            elif not value & 1:
                q.ready = False
            return
        if q.ready:
            return  # the driver must not change a live queue; ignore rather than corrupt state
        if offset == Reg.QUEUE_NUM:
            q.size = value
            return
        reg = _ADDR_REGS.get(offset)  # type: ignore[call-overload]
        if reg is not None:
            attr, shift = reg
            mask = 0xFFFF_FFFF << shift
            setattr(q, attr, (getattr(q, attr) & ~mask) | (value << shift))

    def _reset_transport(self) -> None:
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self._ack(0xFFFF_FFFF)

    # -- machine life cycle --------------------------------------------------------------------
    def reset(self) -> None:
        """Machine reset: device to power-on state, interrupt line low."""
        self.device.reset()
        self._reset_transport()

    # -- VM state (pyvmm.vmstate) -----------------------------------------------------------
    vmstate_version = 1
    _STATE_FIELDS = ("interrupt_status", "device_features_sel", "driver_features_sel", "queue_sel")

    def save_state(self) -> dict[str, Any]:
        from pyvmm.devices.virtio.state import save_device

        with self.device.lock:
            st = fields.capture(self, self._STATE_FIELDS)
            st["device"] = save_device(self.device)
            return st

    def load_state(self, state: dict[str, Any], version: int) -> None:
        from pyvmm.devices.virtio.state import load_device

        with self.device.lock:
            fields.apply(self, self._STATE_FIELDS, state)
            self.interrupt_status &= 0x3
            load_device(self.device, fields.need(state, "device", dict, "virtio-mmio"))
        with self._irq_lock:
            if self.irq is not None:
                self.irq.set_level(bool(self.interrupt_status))

    def vmstate_post_load(self) -> None:
        from pyvmm.devices.virtio.state import kick_ready_queues

        kick_ready_queues(self.device)

    def close(self) -> None:
        for q, fd in list(self._eventfds.items()):
            if self._eventfd_loop is not None:
                self._eventfd_loop.remove_reader(fd)
            os.close(fd)
            del self._eventfds[q]
        self.device.close()

    # -- ioeventfd hook -------------------------------------------------------------------------
    def notify_eventfd(self, queue: int, loop: MainLoop | None = None) -> int:
        """An eventfd that, when signalled, counts as a QueueNotify write for ``queue``.

        The machine registers it with the accelerator (KVM_IOEVENTFD on ``base +
        NOTIFY_OFFSET``, 4 bytes, ``datamatch=queue``).  It is read on ``loop`` (default:
        the device's loop), so the handler runs there and never on a vCPU thread.
        """
        if queue in self._eventfds:
            return self._eventfds[queue]
        if not 0 <= queue < len(self.device.queues):
            raise ValueError(f"{self.device.name}: no queue {queue}")
        own = self.device.kick_eventfd(queue)
        if own is not None:  # the device's own (vhost-user: the back end reads it)
            return own
        loop = loop or self.device.loop or self._eventfd_loop
        if loop is None:
            raise ValueError(f"{self.device.name}: an ioeventfd needs a loop to be read on")
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        loop.add_reader(fd, self.device.ioeventfd_reader(fd, queue))
        self._eventfd_loop = loop
        self._eventfds[queue] = fd
        return fd


class EventfdIrqLine:
    """A level interrupt carried by a KVM irqfd with a resample eventfd.

    ``set_level(True)`` signals the irqfd (KVM raises the GSI).  KVM lowers the line
    itself when the guest EOIs and signals ``resample_fd``; if the device still has an
    interrupt pending, :meth:`_on_resample` raises it again.  A resample event handled
    late can re-raise for an interrupt the guest already serviced, giving it an interrupt
    with InterruptStatus 0 now and then (Linux answers IRQ_NONE; this is the same trade
    as VFIO's INTx resampling) but never loses one.  The machine registers
    both fds with ``vm.irqfd(line.irqfd, gsi, resample_fd=line.resample_fd)``.
    """

    def __init__(self, loop: MainLoop) -> None:
        self.irqfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.resample_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.level = False
        self._lock = threading.Lock()
        self._loop = loop
        loop.add_reader(self.resample_fd, self._on_resample)

    def set_level(self, level: bool) -> None:
        with self._lock:
            if level and not self.level:
                os.eventfd_write(self.irqfd, 1)
            self.level = level

    def _on_resample(self) -> None:
        try:
            os.eventfd_read(self.resample_fd)
        except BlockingIOError:
            return
        with self._lock:
            if self.level:
                os.eventfd_write(self.irqfd, 1)

    def close(self) -> None:
        self._loop.remove_reader(self.resample_fd)
        os.close(self.irqfd)
        os.close(self.resample_fd)


def is_live(device: VirtioDevice) -> bool:
    """Whether the driver finished initialisation and the device is not broken."""
    return bool(device.status & Status.DRIVER_OK) and not device.status & Status.NEEDS_RESET
