"""The modern virtio-pci transport (virtio 1.x section 4.1), without the legacy interface.

One :class:`VirtioPci` is a PCI function (vendor 0x1af4, device 0x1040 +
virtio device id, revision 1) in front of one transport-neutral
:class:`~pyvmm.devices.virtio.device.VirtioDevice`, so the same device
classes work over virtio-mmio and virtio-pci.  Layout::

    BAR 1 (4 KiB, only if the machine can deliver MSIs): MSI-X table at 0, PBA at 0x800
    BAR 4 (16 KiB): common config 0x0000, ISR 0x1000, device config 0x2000,
                    notifications 0x3000 (queue i at 0x3000 + 4*i)

The vendor capabilities (type COMMON, ISR, DEVICE, NOTIFY and PCI_CFG)
point the driver at these regions.

Interrupts: with MSI-X enabled, each queue and the configuration change use
the vector the driver programmed (``queue_msix_vector`` /
``config_msix_vector``; values beyond the table read back as NO_VECTOR, as
the spec asks).  Otherwise INTA is asserted while the ISR is non-zero and a
read of the ISR clears it.

Every register access is checked: unknown offsets or wrong widths read 0 and
writes are dropped; queue fields with an out-of-range ``queue_select``
likewise; a live queue's addresses cannot be changed.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from typing import Any

from pyvmm.capabilities import IoEventFds, MsiIrqFds
from pyvmm.devices.pci.config import BarKind, BarSpec, CapId, Reg, access_ok
from pyvmm.devices.pci.host import PciDevice
from pyvmm.devices.pci.msix import NO_VECTOR
from pyvmm.devices.virtio.device import DeviceId, VirtioDevice
from pyvmm.errors import PyvmmError
from pyvmm.loop import MainLoop
from pyvmm.vmstate import VmStateError, fields

log = logging.getLogger(__name__)

VIRTIO_VENDOR = 0x1AF4
DEVICE_ID_BASE = 0x1040
SUBSYS_ID = 0x1100

MSIX_BAR = 1
REGS_BAR = 4
REGS_BAR_SIZE = 0x4000
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800

COMMON_OFFSET, COMMON_LENGTH = 0x0000, 0x40
ISR_OFFSET, ISR_LENGTH = 0x1000, 4
DEVICE_OFFSET, DEVICE_LENGTH = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_LENGTH = 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4

CLASS_CODES: dict[int, int] = {DeviceId.NET: 0x020000, DeviceId.BLOCK: 0x010000, DeviceId.CONSOLE: 0x078000,
               DeviceId.RNG: 0x00FF00, DeviceId.FS: 0x018000}


class CfgType:
    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI_CFG = 5


class Common:
    """Offsets in ``struct virtio_pci_common_cfg``."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30


#: field offset -> width in bytes (64-bit fields may also be accessed as two dwords).
_FIELD_SIZES = {0x00: 4, 0x04: 4, 0x08: 4, 0x0C: 4, 0x10: 2, 0x12: 2, 0x14: 1, 0x15: 1, 0x16: 2, 0x18: 2,
                0x1A: 2, 0x1C: 2, 0x1E: 2, 0x20: 8, 0x28: 8, 0x30: 8}
_ADDR_FIELDS = {Common.QUEUE_DESC: "desc_addr", Common.QUEUE_DRIVER: "avail_addr", Common.QUEUE_DEVICE: "used_addr"}
ISR_QUEUE, ISR_CONFIG = 1, 2


def _vendor_cap(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """Body of a ``virtio_pci_cap`` after the id/next bytes (cap_len counts the whole capability)."""
    return struct.pack("<BBBBHII", 16 + len(extra), cfg_type, bar, 0, 0, offset, length) + extra


class VirtioPci(PciDevice):
    """A virtio device on PCI (modern interface only)."""

    def __init__(self, device: VirtioDevice, *, msix: bool, msi_sender=None, name: str | None = None) -> None:
        dev_id = int(device.device_id)
        bars = [BarSpec(REGS_BAR, REGS_BAR_SIZE, BarKind.MEM32)]
        if msix:
            bars.append(BarSpec(MSIX_BAR, MSIX_BAR_SIZE, BarKind.MEM32))
        super().__init__(name or device.name, vendor=VIRTIO_VENDOR, device=DEVICE_ID_BASE + dev_id,
                         class_code=CLASS_CODES.get(dev_id, 0xFF0000), revision=1,
                         subsys_vendor=VIRTIO_VENDOR, subsys_id=SUBSYS_ID, bars=bars)
        self.device = device
        nq = len(device.queues)
        cfg = self.config
        cfg.add_capability(CapId.VENDOR, _vendor_cap(CfgType.COMMON, REGS_BAR, COMMON_OFFSET, COMMON_LENGTH))
        cfg.add_capability(CapId.VENDOR, _vendor_cap(CfgType.ISR, REGS_BAR, ISR_OFFSET, ISR_LENGTH))
        cfg.add_capability(CapId.VENDOR, _vendor_cap(CfgType.DEVICE, REGS_BAR, DEVICE_OFFSET, DEVICE_LENGTH))
        cfg.add_capability(CapId.VENDOR, _vendor_cap(CfgType.NOTIFY, REGS_BAR, NOTIFY_OFFSET, NOTIFY_LENGTH,
                                                     struct.pack("<I", NOTIFY_MULTIPLIER)))
        # PCI_CFG: bar, offset and length are writable, then 4 data bytes that access the BAR.
        body = _vendor_cap(CfgType.PCI_CFG, 0, 0, 0, bytes(4))
        wmask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + bytes(4)
        self._pci_cfg = cfg.add_capability(CapId.VENDOR, body, wmask)
        if msix:
            if msi_sender is None:
                raise ValueError("MSI-X needs an MSI sender")
            self.add_msix(nq + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET, msi_sender)
        self._irq_lock = threading.Lock()
        self.isr = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * nq
        self._ioeventfds: IoEventFds | None = None
        self._kick_fds: list[int] = []
        self._owned_kick_fds: set[int] = set()
        self._kick_loop: MainLoop | None = None
        self._ioeventfd_base: int | None = None
        self._msi_irqfds: MsiIrqFds | None = None
        self._irqfd_queues: set[int] = set()  # queues whose call eventfd is an MSI irqfd in the kernel
        self._route_lock = threading.Lock()
        device.bind(self)

    # -- VirtioInterrupt ---------------------------------------------------------------------------------
    def queue_interrupt(self, queue: int) -> None:
        vector = self.queue_vectors[queue] if 0 <= queue < len(self.queue_vectors) else NO_VECTOR
        self._signal(vector, ISR_QUEUE)

    def config_interrupt(self) -> None:
        self._signal(self.config_vector, ISR_CONFIG)

    def _signal(self, vector: int, bit: int) -> None:
        msix = self.msix
        with self._irq_lock:
            self.isr |= bit
            if msix is not None and msix.enabled:
                if vector != NO_VECTOR:
                    msix.notify(vector)
                return
            self.set_intx(True)

    def _read_isr(self) -> int:
        with self._irq_lock:
            value, self.isr = self.isr, 0
            self.set_intx(False)
            return value

    # -- BAR accesses ---------------------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != REGS_BAR:
            return super().bar_read(bar, offset, size)
        if offset < COMMON_OFFSET + COMMON_LENGTH:
            return self._common_read(offset, size)
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_LENGTH:
            return self._read_isr() if offset == ISR_OFFSET else 0
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            return self.device.read_config(offset - DEVICE_OFFSET, size)
        return 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != REGS_BAR:
            super().bar_write(bar, offset, size, value)
            return
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_LENGTH:
            rel = offset - NOTIFY_OFFSET
            if rel % NOTIFY_MULTIPLIER == 0:
                self.device.notify(rel // NOTIFY_MULTIPLIER)  # notify() ignores bad indices
            return
        if offset < COMMON_OFFSET + COMMON_LENGTH:
            self._common_write(offset, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            self.device.write_config(offset - DEVICE_OFFSET, size, value)

    @staticmethod
    def _field(offset: int, size: int) -> tuple[int, int] | None:
        """(field offset, byte shift) for a well-formed access, else None."""
        width = _FIELD_SIZES.get(offset)
        if width is not None and size == width:
            return offset, 0
        if size == 4 and offset - 4 in _ADDR_FIELDS:
            return offset - 4, 32
        if size == 4 and offset in _ADDR_FIELDS:
            return offset, 0
        return None

    def _queue(self):
        sel = self.queue_select
        queues = self.device.queues
        return queues[sel] if sel < len(queues) else None

    def _common_read(self, offset: int, size: int) -> int:
        f = self._field(offset, size)
        if f is None:
            return 0
        field, shift = f
        dev = self.device
        mask = (1 << (8 * size)) - 1
        with dev.lock:
            if field == Common.DEVICE_FEATURE_SELECT:
                return self.device_feature_select
            if field == Common.DEVICE_FEATURE:
                return dev.device_feature_word(self.device_feature_select)
            if field == Common.DRIVER_FEATURE_SELECT:
                return self.driver_feature_select
            if field == Common.DRIVER_FEATURE:
                sel = self.driver_feature_select
                return (dev.driver_features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
            if field == Common.CONFIG_MSIX_VECTOR:
                return self.config_vector
            if field == Common.NUM_QUEUES:
                return len(dev.queues)
            if field == Common.DEVICE_STATUS:
                return dev.status
            if field == Common.CONFIG_GENERATION:
                return dev.config_generation & 0xFF
            if field == Common.QUEUE_SELECT:
                return self.queue_select
            q = self._queue()
            if q is None:
                return 0
            if field == Common.QUEUE_SIZE:
                return q.size
            if field == Common.QUEUE_MSIX_VECTOR:
                return self.queue_vectors[q.index]
            if field == Common.QUEUE_ENABLE:
                return int(q.ready)
            if field == Common.QUEUE_NOTIFY_OFF:
                return q.index
            attr = _ADDR_FIELDS.get(field)
            if attr is not None:
                return (getattr(q, attr) >> shift) & mask
        return 0

    def _valid_vector(self, vector: int) -> int:
        msix = self.msix
        return vector if msix is not None and vector < msix.nvectors else NO_VECTOR

    def _common_write(self, offset: int, size: int, value: int) -> None:
        f = self._field(offset, size)
        if f is None:
            return
        field, shift = f
        dev = self.device
        with dev.lock:
            if field == Common.DEVICE_FEATURE_SELECT:
                self.device_feature_select = value
            elif field == Common.DRIVER_FEATURE_SELECT:
                self.driver_feature_select = value
            elif field == Common.DRIVER_FEATURE:
                dev.write_driver_features(self.driver_feature_select, value)
            elif field == Common.CONFIG_MSIX_VECTOR:
                self.config_vector = self._valid_vector(value)
            elif field == Common.DEVICE_STATUS:
                dev.set_status(value)
                if value & 0xFF == 0:
                    self._reset_transport()
            elif field == Common.QUEUE_SELECT:
                self.queue_select = value
            else:
                q = self._queue()
                if q is None:
                    return
                if field == Common.QUEUE_MSIX_VECTOR:
                    self.queue_vectors[q.index] = self._valid_vector(value)
                    self.update_call_routes()
                elif field == Common.QUEUE_ENABLE:
                    if value == 1 and not q.ready:
                        dev.queue_ready(q.index)
                elif q.ready:
                    return  # a live queue's size and addresses are fixed
                elif field == Common.QUEUE_SIZE:
                    q.size = value
                elif field in _ADDR_FIELDS:
                    attr = _ADDR_FIELDS[field]
                    width_mask = ((1 << (8 * size)) - 1) << shift
                    setattr(q, attr, (getattr(q, attr) & ~width_mask) | ((value << shift) & width_mask))

    def _reset_transport(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.device.queues)
        with self._irq_lock:
            self.isr = 0
            self.set_intx(False)
        self.update_call_routes()

    # -- PCI_CFG window (config-space access to the BARs) -------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        data = self._pci_cfg + 16
        if access_ok(offset, size) and data <= offset < data + 4:
            bar, off, length = self._pci_cfg_target()
            if length in (1, 2, 4) and bar in self.bars and off + length <= self.bars[bar].size:
                value = self.bar_read(bar, off, length)
                self.config.set_u32(data, value)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        data = self._pci_cfg + 16
        if access_ok(offset, size) and data <= offset < data + 4:
            bar, off, length = self._pci_cfg_target()
            if length in (1, 2, 4) and bar in self.bars and off + length <= self.bars[bar].size:
                self.bar_write(bar, off, length, self.config.get(data, length))

    def _pci_cfg_target(self) -> tuple[int, int, int]:
        c = self._pci_cfg
        return self.config.get(c + 4, 1), self.config.get(c + 8, 4), self.config.get(c + 12, 4)

    # -- ioeventfd fast path -----------------------------------------------------------------------------------
    def attach_ioeventfds(self, ioeventfds: IoEventFds, loop: MainLoop) -> None:
        """Let notify writes signal eventfds read on ``loop`` instead of exiting to userspace.

        One eventfd per queue is registered for 2-byte writes to that queue's notify address,
        and moved whenever BAR 4 moves.  Other accesses still exit and take the normal path.
        """
        with self.cfg_lock:
            self._set_ioeventfds(None)
            self._ioeventfds = ioeventfds
            if not self._kick_fds:
                for q in range(len(self.device.queues)):
                    fd = self.device.kick_eventfd(q)
                    if fd is None:  # the device's own eventfds (vhost-user) are read by someone else
                        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                        loop.add_reader(fd, self.device.ioeventfd_reader(fd, q))
                        self._owned_kick_fds.add(fd)
                    self._kick_fds.append(fd)
                self._kick_loop = loop
            self._set_ioeventfds(self.mapped_bars().get(REGS_BAR))

    def _set_ioeventfds(self, base: int | None) -> None:
        fast = self._ioeventfds
        if fast is None or base == self._ioeventfd_base:
            return
        for deassign, at in ((True, self._ioeventfd_base), (False, base)):
            if at is None:
                continue
            try:
                for q, fd in enumerate(self._kick_fds):
                    addr = at + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q
                    if deassign:
                        fast.unregister_ioeventfd(fd, addr, 2, pio=False)
                    else:
                        fast.register_ioeventfd(fd, addr, 2, pio=False)
            except PyvmmError as e:
                log.info("%s: ioeventfd %s at %#x failed (%s); notifications exit to userspace",
                         self.name, "removal" if deassign else "registration", at, e)
                if not deassign:
                    return
        self._ioeventfd_base = base
        if base is not None:
            log.debug("%s: notify ioeventfds at %#x", self.name, base + NOTIFY_OFFSET)

    # -- irqfd fast path for call eventfds (vhost-user) ------------------------------------------------------
    def attach_msi_irqfds(self, fast: MsiIrqFds) -> None:
        """Deliver each queue's call eventfd as its MSI-X vector in the kernel, while the vector is usable.

        Only for devices with call eventfds (vhost-user).  A queue whose vector is unset, masked,
        or whose MSI-X is off goes back to the device's relay (which sets the pending bit).
        """
        nq = len(self.device.queues)
        if self.msix is None or all(self.device.call_eventfd(q) is None for q in range(nq)):
            return
        self._msi_irqfds = fast
        self.msix.on_change = self.update_call_routes
        self.update_call_routes()

    def update_call_routes(self) -> None:
        fast, msix = self._msi_irqfds, self.msix
        if fast is None or msix is None:
            return
        with self._route_lock:
            for q, vector in enumerate(self.queue_vectors):
                fd = self.device.call_eventfd(q)
                if fd is None:
                    continue
                message = msix.message(vector) if vector != NO_VECTOR else None
                if message is not None:
                    try:
                        fast.register_msi_irqfd(fd, *message)
                    except PyvmmError as e:
                        log.info("%s: no irqfd for queue %d (%s); its calls go through the VMM", self.name, q, e)
                        message = None
                if message is not None and q not in self._irqfd_queues:
                    self._irqfd_queues.add(q)
                    self.device.set_call_relay(q, False)
                    log.debug("%s: queue %d calls reach the guest by irqfd (MSI-X vector %d)", self.name, q,
                              vector)
                elif message is None and q in self._irqfd_queues:
                    fast.unregister_msi_irqfd(fd)
                    self._irqfd_queues.discard(q)
                    self.device.set_call_relay(q, True)

    def bar_moved(self, index: int, base: int | None) -> None:
        if index == REGS_BAR:
            self._set_ioeventfds(base)

    # -- VM state (pyvmm.vmstate) -------------------------------------------------------------------------------
    vmstate_version = 1
    _STATE_FIELDS = ("isr", "device_feature_select", "driver_feature_select", "queue_select", "config_vector",
                     "queue_vectors")

    def save_state(self) -> dict[str, Any]:
        from pyvmm.devices.pci.state import save_function
        from pyvmm.devices.virtio.state import save_device

        with self.device.lock:
            st = fields.capture(self, self._STATE_FIELDS)
            st["pci"] = save_function(self)
            st["device"] = save_device(self.device)
            return st

    def load_state(self, state: dict[str, Any], version: int) -> None:
        from pyvmm.devices.pci.state import load_function
        from pyvmm.devices.virtio.state import load_device

        vectors = state.get("queue_vectors")
        if not isinstance(vectors, list) or len(vectors) != len(self.queue_vectors):
            raise VmStateError(f"{self.name}: queue vectors in the state do not match this device")
        with self.device.lock:
            fields.apply(self, self._STATE_FIELDS, state)
            self.config_vector = self._valid_vector(self.config_vector)
            self.queue_vectors = [self._valid_vector(v) for v in self.queue_vectors]
            load_device(self.device, fields.need(state, "device", dict, self.name))
            load_function(self, fields.need(state, "pci", dict, self.name))

    def vmstate_post_load(self) -> None:
        from pyvmm.devices.virtio.state import kick_ready_queues

        kick_ready_queues(self.device)

    # -- life cycle ----------------------------------------------------------------------------------------------
    def device_reset(self) -> None:
        with self.device.lock:
            self.device.reset()
            self._reset_transport()

    def close(self) -> None:
        with self._route_lock:
            fast, self._msi_irqfds = self._msi_irqfds, None
            for q in sorted(self._irqfd_queues):
                fd = self.device.call_eventfd(q)
                if fast is not None and fd is not None:
                    fast.unregister_msi_irqfd(fd)
            self._irqfd_queues.clear()
        with self.cfg_lock:
            self._set_ioeventfds(None)
            for fd in self._kick_fds:
                if fd not in self._owned_kick_fds:
                    continue
                if self._kick_loop is not None:
                    self._kick_loop.remove_reader(fd)
                os.close(fd)
            self._kick_fds = []
            self._owned_kick_fds.clear()
        self.device.close()


assert Reg.CAP_PTR == 0x34
