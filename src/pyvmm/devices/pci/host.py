"""The PCI host bridge: configuration mechanism #1, bus 0, BAR mapping and INTx.

Configuration mechanism #1 (PCI Local Bus 3.0 section 3.2.2.3.2): the guest
writes an address (enable bit 31, bus 23:16, device 15:11, function 10:8,
register 7:2) to port 0xcf8 as a dword, then reads or writes 1, 2 or 4 bytes
at 0xcfc-0xcff.  Only bus 0 exists; absent functions read all-ones.

Each :class:`PciDevice` owns a :class:`~pyvmm.devices.pci.config.ConfigSpace`.
BAR registers are ordinary masked bytes (writing all-ones reads back the
size mask, which is how sizing works); after each write to a BAR or the
command register the device recomputes where its BARs should be decoded
and the host moves the bus registrations: a memory BAR is on the MMIO bus
only while the command register's memory-enable bit is set and its address
is sane (not zero, not overlapping RAM or another device, below 4 GiB for
32-bit BARs), likewise I/O BARs with the I/O-enable bit.

INTx: a device with an interrupt pin gets the GSI the DSDT's ``_PRT``
declares (:func:`~pyvmm.x86.acpi.pci_intx_gsi`); the line is
driven level-high while asserted and the command register's INTx-disable
bit is clear.  MSI-X lives in :mod:`.msix`.

The host also plays firmware: :meth:`PciHost.assign_resources` places every
BAR in the ACPI windows and enables decoding, as a BIOS would, so a kernel
booted directly finds working devices (Linux keeps such assignments).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from pyvmm.bus import Bus, BusError
from pyvmm.devices.pci.config import (
    NUM_BARS,
    BarKind,
    BarSpec,
    Command,
    ConfigSpace,
    Reg,
    StatusBits,
    access_ok,
)
from pyvmm.devices.pci.msix import MsiSender, MsixTable
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit import guest_log
from pyvmm.x86 import layout
from pyvmm.x86.acpi import AcpiPciHost, pci_intx_gsi

log = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT = layout.PCI_CONFIG_ADDRESS_PORT
CONFIG_DATA_PORT = layout.PCI_CONFIG_DATA_PORT
ENABLE_BIT = 1 << 31
FOUR_GIB = 1 << 32

#: Default PCI windows: 32-bit MMIO below the virtio-mmio/IOAPIC area, I/O ports above 0x1000.
DEFAULT_WINDOWS = AcpiPciHost(mem32_base=layout.PCI_MEM32_BASE, mem32_limit=layout.PCI_MEM32_LIMIT,
                              io_base=layout.PCI_IO_BASE, io_limit=layout.PCI_IO_LIMIT, slots=32,
                              intx_gsis=layout.PCI_INTX_GSIS)


class LevelLine(Protocol):
    def set_level(self, level: bool) -> None: ...


class _BarWindow:
    """The bus-side object of one BAR (a distinct object so it can be unregistered alone).

    While the command register turns decoding off, the window stays registered but
    ``decoding`` is False: it reads all-ones and ignores writes, as an absent device.
    So the decode toggles around BAR sizing do not change the bus at all; only a BAR
    that moves (or a stale window in the way of another BAR) changes the bus.
    """

    __slots__ = ("device", "bar", "decoding")

    def __init__(self, device: PciDevice, bar: int) -> None:
        self.device = device
        self.bar = bar
        self.decoding = False

    def io_read(self, offset: int, size: int) -> int:
        if not self.decoding:
            return (1 << (8 * size)) - 1
        return self.device.bar_read(self.bar, offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        if self.decoding:
            self.device.bar_write(self.bar, offset, size, value)


class PciDevice:
    """Base class of a PCI function: config space, BARs, INTx pin, optional MSI-X."""

    def __init__(self, name: str, *, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsys_vendor: int = 0, subsys_id: int = 0, bars: list[BarSpec] | tuple[BarSpec, ...] = (),
                 intx: bool = True) -> None:
        self.name = name
        self.config = ConfigSpace()
        self.config.init_header(vendor=vendor, device=device, class_code=class_code, revision=revision,
                                subsys_vendor=subsys_vendor, subsys_id=subsys_id, interrupt_pin=1 if intx else 0)
        self.bars: dict[int, BarSpec] = {}
        for spec in bars:
            self._add_bar(spec)
        self.host: PciHost | None = None
        self.slot = -1
        self.intx_line: LevelLine | None = None
        self._intx_level = False
        self.msix: MsixTable | None = None
        self.cfg_lock = threading.RLock()
        self._windows = {i: _BarWindow(self, i) for i in self.bars}
        self._mapped: dict[int, tuple[bool, int]] = {}  # bar -> (is_io, base) while decoded

    def _add_bar(self, spec: BarSpec) -> None:
        taken = set(self.bars) | {i + 1 for i, b in self.bars.items() if b.kind is BarKind.MEM64}
        if spec.index in taken or (spec.kind is BarKind.MEM64 and spec.index + 1 in self.bars):
            raise ValueError(f"{self.name}: BAR {spec.index} overlaps another BAR")
        self.bars[spec.index] = spec
        off = Reg.BAR0 + 4 * spec.index
        self.config.set_u32(off, spec.flag_bits)
        low_mask = ~(spec.size - 1) & (0xFFFF_FFFC if spec.is_io else 0xFFFF_FFF0)
        self.config.set_writable(off, 4, low_mask)
        if spec.kind is BarKind.MEM64:
            self.config.set_writable(off + 4, 4, 0xFFFF_FFFF)

    # -- hooks for subclasses ---------------------------------------------------------------------------
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` in BAR ``bar`` (offset < BAR size)."""
        if self.msix is not None and bar == self.msix.bar and self.msix.in_range(offset):
            return self.msix.read(offset, size)
        return 0

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if self.msix is not None and bar == self.msix.bar and self.msix.in_range(offset):
            self.msix.write(offset, size, value)

    def device_reset(self) -> None:
        """Subclass hook: machine reset of the function's own state."""

    # -- MSI-X and INTx -----------------------------------------------------------------------------------
    def add_msix(self, nvectors: int, bar: int, table_offset: int, pba_offset: int, sender: MsiSender) -> MsixTable:
        spec = self.bars.get(bar)
        if spec is None or spec.is_io:
            raise ValueError(f"{self.name}: MSI-X needs memory BAR {bar}")
        self.msix = MsixTable(self.config, nvectors, bar, table_offset, pba_offset, sender)
        if max(self.msix.table_offset + self.msix.table_size, self.msix.pba_offset + self.msix.pba_size) > spec.size:
            raise ValueError(f"{self.name}: MSI-X structures do not fit BAR {bar}")
        return self.msix

    def set_intx(self, level: bool) -> None:
        """Assert (True) or deassert INTA; masked by the command register's INTx-disable bit."""
        with self.cfg_lock:
            self._intx_level = level
            self._drive_intx()

    def _drive_intx(self) -> None:
        status = self.config.get(Reg.STATUS, 2)
        status = status | StatusBits.INTERRUPT if self._intx_level else status & ~StatusBits.INTERRUPT
        self.config.set_u16(Reg.STATUS, status)
        if self.intx_line is not None:
            disabled = self.config.get(Reg.COMMAND, 2) & Command.INTX_DISABLE
            self.intx_line.set_level(self._intx_level and not disabled)

    # -- configuration space accesses -----------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        with self.cfg_lock:
            return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if not access_ok(offset, size):
            return
        with self.cfg_lock:
            self.config.write(offset, size, value)
            end = offset + size
            released = False
            if offset < Reg.COMMAND + 2 and end > Reg.COMMAND or (offset < Reg.BAR0 + 4 * NUM_BARS
                                                                   and end > Reg.BAR0):
                released = self.update_mappings()
                self._drive_intx()
            msix = self.msix
            if msix is not None and offset < msix.cap_offset + 4 and end > msix.cap_offset + 2:
                msix.control_written()
        if released and self.host is not None:
            self.host.remap_refused(self)  # a BAR kept off by this one's old range may decode now

    # -- BARs ----------------------------------------------------------------------------------------------
    def bar_address(self, index: int) -> int:
        spec = self.bars[index]
        off = Reg.BAR0 + 4 * index
        addr = self.config.get(off, 4) & (0xFFFF_FFFC if spec.is_io else 0xFFFF_FFF0)
        if spec.kind is BarKind.MEM64:
            addr |= self.config.get(off + 4, 4) << 32
        return addr

    def set_bar_address(self, index: int, address: int) -> None:
        """Program a BAR as firmware would (device side, not through the write mask)."""
        spec = self.bars[index]
        if address % spec.size:
            raise ValueError(f"{self.name}: BAR {index} address {address:#x} not aligned to {spec.size:#x}")
        off = Reg.BAR0 + 4 * index
        self.config.set_u32(off, (address & 0xFFFF_FFFF) | spec.flag_bits)
        if spec.kind is BarKind.MEM64:
            self.config.set_u32(off + 4, address >> 32)

    def update_mappings(self) -> bool:
        """Put each BAR where the command register and BAR registers say (host moves the bus ranges).

        True if a range this device decoded is no longer decoded there (moved or turned off).
        """
        released = False
        if self.host is None:
            return released
        command = self.config.get(Reg.COMMAND, 2)
        for index, spec in self.bars.items():
            window = self._windows[index]
            was = self.mapped_bars().get(index)
            enabled = bool(command & (Command.IO if spec.is_io else Command.MEMORY))
            have = self._mapped.get(index)
            if not enabled:
                window.decoding = False  # registration kept: see _BarWindow
            else:
                want = (spec.is_io, self.bar_address(index))
                if want != have:
                    window.decoding = False
                    if have is not None:
                        self.host.unmap_bar(window, have[0])
                        del self._mapped[index]
                    if self.host.map_bar(self, index, spec, want[1], window):
                        self._mapped[index] = want
                window.decoding = index in self._mapped
            now = self.mapped_bars().get(index)
            if now != was:
                released |= was is not None
                self.bar_moved(index, now)
        return released

    def bar_moved(self, index: int, base: int | None) -> None:
        """Subclass hook (config lock held): BAR ``index`` is now decoded at ``base`` (None: not decoded)."""

    def unmap_all(self) -> None:
        if self.host is not None:
            for index in list(self._mapped):
                decoded = self._windows[index].decoding
                self.evict(index)
                if decoded:
                    self.bar_moved(index, None)
        self._mapped.clear()

    def evict(self, index: int) -> None:
        """Take BAR ``index``'s window off the bus (host: a stale window is in another BAR's way)."""
        have = self._mapped.pop(index, None)
        window = self._windows[index]
        window.decoding = False
        if have is not None and self.host is not None:
            self.host.unmap_bar(window, have[0])

    def mapped_bars(self) -> dict[int, int]:
        """BAR index -> base for the BARs currently decoded."""
        return {i: base for i, (_io, base) in self._mapped.items() if self._windows[i].decoding}

    # -- life cycle --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Machine reset: BARs unassigned, decoding off, INTx low, MSI-X off."""
        with self.cfg_lock:
            self.unmap_all()
            self.config.set_u16(Reg.COMMAND, 0)
            for index, spec in self.bars.items():
                self.config.set_u32(Reg.BAR0 + 4 * index, spec.flag_bits)
                if spec.kind is BarKind.MEM64:
                    self.config.set_u32(Reg.BAR0 + 4 * index + 4, 0)
            if self.msix is not None:
                self.msix.reset()
            self._intx_level = False
            self._drive_intx()
        self.device_reset()


class HostBridge(PciDevice):
    """Function 00.0: a plain host bridge (class 06/00) so the bus looks like a PC's."""

    def __init__(self) -> None:
        super().__init__("host-bridge", vendor=0x8086, device=0x29C0, class_code=0x060000, intx=False)


class _AddressPort:
    def __init__(self, host: PciHost) -> None:
        self.host = host

    def io_read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.host.address
        return (1 << (8 * size)) - 1

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:  # byte/word writes to 0xcf8-0xcfb are not config cycles
            self.host.address = value & 0x80FF_FFFC


class _DataPort:
    def __init__(self, host: PciHost) -> None:
        self.host = host

    def io_read(self, offset: int, size: int) -> int:
        with self.host.config_lock:
            dev, reg = self.host.target(offset, size)
            if dev is None:
                return (1 << (8 * size)) - 1
            return dev.config_read(reg, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self.host.config_lock:
            dev, reg = self.host.target(offset, size)
            if dev is not None:
                dev.config_write(reg, size, value)


class PciHost:
    """Bus 0 behind configuration mechanism #1, with BAR placement on the machine's buses."""

    def __init__(self, memory: GuestMemory, mmio_bus: Bus, io_bus: Bus,
                 irq_line: Callable[[int], LevelLine] | None = None, *,
                 windows: AcpiPciHost = DEFAULT_WINDOWS, msi_sender: MsiSender | None = None,
                 host_bridge: bool = True) -> None:
        self.memory = memory
        self.mmio_bus = mmio_bus
        self.io_bus = io_bus
        self.irq_line = irq_line
        self.windows = windows
        self.msi_sender = msi_sender
        self.address = 0
        self.devices: dict[int, PciDevice] = {}
        self._map_lock = threading.RLock()
        #: One configuration cycle at a time, as on a real host bridge.  Also orders the locks:
        #: a BAR move may evict another function's stale window (its cfg_lock) under this lock.
        self.config_lock = threading.Lock()
        self._windows: dict[_BarWindow, tuple[bool, int, int]] = {}  # registered: (is_io, start, end)
        self.address_port = _AddressPort(self)
        self.data_port = _DataPort(self)
        io_bus.register(CONFIG_ADDRESS_PORT, 4, self.address_port, "pci-config-address")
        io_bus.register(CONFIG_DATA_PORT, 4, self.data_port, "pci-config-data")
        if host_bridge:
            self.add(HostBridge(), slot=0)

    # -- devices -------------------------------------------------------------------------------------------
    @property
    def msi_capable(self) -> bool:
        """Whether devices may advertise MSI-X (the interrupt controllers can take MSIs)."""
        return self.msi_sender is not None

    def send_msi(self, address: int, data: int) -> None:
        if self.msi_sender is not None:
            self.msi_sender(address, data)

    def add(self, device: PciDevice, slot: int | None = None) -> int:
        """Plug ``device`` into ``slot`` (or the first free one); returns the slot."""
        if slot is None:
            free = [s for s in range(self.windows.slots) if s not in self.devices]
            if not free:
                raise ConfigError(f"no free PCI slot for {device.name}")
            slot = free[0]
        if not 0 <= slot < self.windows.slots:
            raise ConfigError(f"PCI slot {slot} out of range (0-{self.windows.slots - 1})")
        if slot in self.devices:
            raise ConfigError(f"PCI slot {slot} is already used by {self.devices[slot].name}")
        device.host = self
        device.slot = slot
        self.devices[slot] = device
        if device.config.get(Reg.INTERRUPT_PIN, 1) and self.irq_line is not None:
            gsi = pci_intx_gsi(self.windows, slot, 0)
            device.intx_line = self.irq_line(gsi)
            device.config.set_u8(Reg.INTERRUPT_LINE, gsi)
        log.debug("pci 00:%02x.0 %s", slot, device.name)
        return slot

    def target(self, offset: int, size: int) -> tuple[PciDevice | None, int]:
        """The function and register a data-port access addresses, per the address register."""
        addr = self.address
        if not addr & ENABLE_BIT or not access_ok(offset, size, 4):
            return None, 0
        bus, slot, fn = (addr >> 16) & 0xFF, (addr >> 11) & 0x1F, (addr >> 8) & 7
        if bus != 0 or fn != 0:
            return None, 0
        return self.devices.get(slot), (addr & 0xFC) + offset

    # -- BAR placement -------------------------------------------------------------------------------------
    def _bar_ok(self, spec: BarSpec, base: int) -> bool:
        if base == 0:
            return False
        end = base + spec.size
        if spec.is_io:
            return end <= 0x10000
        if spec.kind is BarKind.MEM32 and end > FOUR_GIB:
            return False
        if end > (1 << 64):
            return False
        return not any(base < r.end and r.gpa < end for r in self.memory.regions)

    def map_bar(self, device: PciDevice, index: int, spec: BarSpec, base: int, window: _BarWindow) -> bool:
        if not self._bar_ok(spec, base):
            log.debug("%s: BAR %d at %#x not decoded (zero, out of range or over RAM)", device.name, index, base)
            return False
        bus = self.io_bus if spec.is_io else self.mmio_bus
        with self._map_lock:
            self._evict_stale(spec.is_io, base, base + spec.size)
            try:
                bus.register(base, spec.size, window, f"pci-{device.name}-bar{index}")  # type: ignore[arg-type]
            except BusError as e:
                guest_log(log, logging.WARNING, "%s: BAR %d not decoded: %s", device.name, index, e)
                return False
            self._windows[window] = (spec.is_io, base, base + spec.size)
        log.debug("%s: BAR %d at %#x+%#x", device.name, index, base, spec.size)
        return True

    def remap_refused(self, changed: PciDevice) -> None:
        """Retry the other devices' BARs that are enabled but were refused for a clash.

        Decoding is a function of the registers, as on real hardware: when ``changed`` moves or
        turns off a range, a BAR it was in the way of decodes now.  A device whose config lock is
        busy (another vCPU is writing its registers) retries on that write itself.
        """
        for dev in list(self.devices.values()):
            if dev is changed or not dev.cfg_lock.acquire(blocking=False):
                continue
            try:
                dev.update_mappings()
            finally:
                dev.cfg_lock.release()

    def _evict_stale(self, is_io: bool, start: int, end: int) -> None:
        """Unregister non-decoding windows (decoding turned off) overlapping [start, end)."""
        for window, (w_io, s, e) in list(self._windows.items()):
            if w_io == is_io and s < end and start < e and not window.decoding:
                dev = window.device
                with dev.cfg_lock:
                    if not window.decoding:
                        dev.evict(window.bar)

    def unmap_bar(self, window: _BarWindow, is_io: bool) -> None:
        with self._map_lock:
            (self.io_bus if is_io else self.mmio_bus).unregister(window)  # type: ignore[arg-type]
            self._windows.pop(window, None)

    def assign_resources(self) -> None:
        """Firmware duty: give every BAR an address in the windows and enable decoding."""
        mem = self.windows.mem32_base
        io = self.windows.io_base
        for slot in sorted(self.devices):
            dev = self.devices[slot]
            command = 0
            for index, spec in sorted(dev.bars.items(), key=lambda kv: -kv[1].size):
                if spec.is_io:
                    io = (io + spec.size - 1) & ~(spec.size - 1)
                    if io + spec.size - 1 > self.windows.io_limit:
                        raise ConfigError(f"PCI I/O window exhausted by {dev.name}")
                    dev.set_bar_address(index, io)
                    io += spec.size
                    command |= Command.IO
                else:
                    mem = (mem + spec.size - 1) & ~(spec.size - 1)
                    if mem + spec.size - 1 > self.windows.mem32_limit:
                        raise ConfigError(f"PCI memory window exhausted by {dev.name}")
                    dev.set_bar_address(index, mem)
                    mem += spec.size
                    command |= Command.MEMORY
            with dev.cfg_lock:
                dev.config.set_u16(Reg.COMMAND, dev.config.get(Reg.COMMAND, 2) | command)
                dev.update_mappings()

    # -- life cycle ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.address = 0
        for dev in self.devices.values():
            dev.reset()

    def close(self) -> None:
        for dev in self.devices.values():
            close = getattr(dev, "close", None)
            if close is not None:
                close()
