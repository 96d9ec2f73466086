"""A simulated guest PCI driver for unit tests: config mechanism #1 through the buses, as a guest would.

Used by the PCI and virtio-pci tests (not a test module itself).
"""

from __future__ import annotations

import struct

from pyvmm.bus import Bus
from pyvmm.memory import GuestMemory


class RecordingLine:
    """An interrupt line for the PCI host's ``irq_line`` factory: keeps its level and counts changes."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi
        self.level = False
        self.changes = 0

    def set_level(self, level: bool) -> None:
        self.level = level
        self.changes += 1


class GuestPci:
    """Config-space and BAR accesses through the machine's port and MMIO buses."""

    def __init__(self, io_bus: Bus, mmio_bus: Bus) -> None:
        self.io = io_bus
        self.mmio = mmio_bus

    def _select(self, slot: int, offset: int, bus: int = 0, fn: int = 0) -> None:
        self.io.write(0xCF8, 4, (1 << 31) | (bus << 16) | (slot << 11) | (fn << 8) | (offset & 0xFC))

    def cfg_read(self, slot: int, offset: int, size: int = 4, **kw) -> int:
        self._select(slot, offset, **kw)
        return self.io.read(0xCFC + (offset & 3), size)

    def cfg_write(self, slot: int, offset: int, size: int, value: int, **kw) -> None:
        self._select(slot, offset, **kw)
        self.io.write(0xCFC + (offset & 3), size, value)

    def enumerate(self) -> dict[int, tuple[int, int]]:
        """slot -> (vendor, device) for every present function 0 on bus 0."""
        found = {}
        for slot in range(32):
            v = self.cfg_read(slot, 0)
            if v != 0xFFFF_FFFF:
                found[slot] = (v & 0xFFFF, v >> 16)
        return found

    def size_bar(self, slot: int, index: int) -> tuple[int, int]:
        """(size, flag bits) of a BAR by the all-ones method (64-bit aware); restores the BAR."""
        off = 0x10 + 4 * index
        orig = self.cfg_read(slot, off)
        self.cfg_write(slot, off, 4, 0xFFFF_FFFF)
        low = self.cfg_read(slot, off)
        self.cfg_write(slot, off, 4, orig)
        if low == 0:
            return 0, 0
        if low & 1:
            return (~(low & ~3) & 0xFFFF) + 1, low & 3
        flags = low & 0xF
        mask = low & ~0xF
        if flags & 0x6 == 0x4:
            orig_hi = self.cfg_read(slot, off + 4)
            self.cfg_write(slot, off + 4, 4, 0xFFFF_FFFF)
            hi = self.cfg_read(slot, off + 4)
            self.cfg_write(slot, off + 4, 4, orig_hi)
            mask |= hi << 32
            return (~mask & 0xFFFF_FFFF_FFFF_FFFF) + 1, flags
        return (~mask & 0xFFFF_FFFF) + 1, flags

    def caps(self, slot: int) -> list[tuple[int, int]]:
        """(offset, id) of each capability."""
        out = []
        if not self.cfg_read(slot, 0x06, 2) & 0x10:
            return out
        ptr = self.cfg_read(slot, 0x34, 1)
        while ptr and len(out) < 48:
            out.append((ptr, self.cfg_read(slot, ptr, 1)))
            ptr = self.cfg_read(slot, ptr + 1, 1)
        return out


class Ring:
    """A split virtqueue laid out by the "driver" in guest RAM."""

    def __init__(self, mem: GuestMemory, base: int, size: int) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.avail_idx = 0
        self.next_desc = 0
        mem.fill(base, 0x4000 + 16 * size, 0)

    def add(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Post a chain of (addr, len, device_writable); returns its head."""
        head = self.next_desc
        for i, (addr, length, writable) in enumerate(buffers):
            idx = (head + i) % self.size
            last = i == len(buffers) - 1
            flags = (0 if last else 1) | (2 if writable else 0)
            self.mem.write(self.desc + 16 * idx, struct.pack("<QIHH", addr, length, flags,
                                                            0 if last else (idx + 1) % self.size))
        self.next_desc = (head + len(buffers)) % self.size
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)
        return head

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def used_elem(self, i: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (i % self.size), 8))


class VirtioPciDriver:
    """Enough of Linux's virtio_pci_modern to bring a device to DRIVER_OK through the buses."""

    def __init__(self, pci: GuestPci, slot: int) -> None:
        self.pci = pci
        self.slot = slot
        self.regions: dict[int, int] = {}  # cfg_type -> guest-physical address
        self.notify_mult = 0
        for off, cap_id in pci.caps(slot):
            if cap_id != 0x09:
                continue
            cfg_type = pci.cfg_read(slot, off + 3, 1)
            bar = pci.cfg_read(slot, off + 4, 1)
            offset = pci.cfg_read(slot, off + 8)
            if cfg_type == 5:
                self.pci_cfg_cap = off
                continue
            bar_lo = pci.cfg_read(slot, 0x10 + 4 * bar)
            base = bar_lo & ~0xF
            if bar_lo & 0x6 == 0x4:
                base |= pci.cfg_read(slot, 0x14 + 4 * bar) << 32
            self.regions.setdefault(cfg_type, base + offset)
            if cfg_type == 2:
                self.notify_mult = pci.cfg_read(slot, off + 16)

    def common_read(self, off: int, size: int) -> int:
        return self.pci.mmio.read(self.regions[1] + off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.pci.mmio.write(self.regions[1] + off, size, value)

    def isr(self) -> int:
        return self.pci.mmio.read(self.regions[3], 1)

    def device_cfg(self, off: int, size: int) -> int:
        return self.pci.mmio.read(self.regions[4] + off, size)

    def features(self) -> int:
        self.common_write(0x00, 4, 0)
        lo = self.common_read(0x04, 4)
        self.common_write(0x00, 4, 1)
        return lo | self.common_read(0x04, 4) << 32

    def init(self, features: int) -> None:
        self.common_write(0x14, 1, 0)
        self.common_write(0x14, 1, 1)
        self.common_write(0x14, 1, 3)
        for word in (0, 1):
            self.common_write(0x08, 4, word)
            self.common_write(0x0C, 4, (features >> (32 * word)) & 0xFFFF_FFFF)
        self.common_write(0x14, 1, 0xB)
        assert self.common_read(0x14, 1) & 8, "FEATURES_OK refused"

    def setup_queue(self, index: int, ring: Ring, vector: int = 0xFFFF) -> None:
        self.common_write(0x16, 2, index)
        self.common_write(0x18, 2, ring.size)
        self.common_write(0x1A, 2, vector)
        for off, addr in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
            self.common_write(off, 4, addr & 0xFFFF_FFFF)
            self.common_write(off + 4, 4, addr >> 32)
        self.common_write(0x1C, 2, 1)

    def driver_ok(self) -> None:
        self.common_write(0x14, 1, 0xF)

    def kick(self, index: int) -> None:
        self.common_write(0x16, 2, index)
        off = self.common_read(0x1E, 2)
        self.pci.mmio.write(self.regions[2] + off * self.notify_mult, 2, index)


def pc_devices(config, pci_board, io, mmio, *, memory=None, control=None, loop=None):
    """The PC's device wiring (pyvmm.machine.pc_devices) over a given PCI board, with no accelerator:
    virtio-mmio windows on ``mmio``, interrupt lines that record, port I/O on ``io``."""
    from pyvmm.devices.virtio.board import VirtioMmioBoard
    from pyvmm.machine.pc_devices import PcDevices
    from pyvmm.runstate import VmControl

    memory = memory or pci_board.memory
    virtio = VirtioMmioBoard(memory, mmio, RecordingLine)
    return PcDevices(config, memory=memory, control=control or VmControl(), main_loop=loop or virtio.loop,
                     irq_line=RecordingLine, add_io=lambda base, size, dev, name: io.register(base, size, dev, name),
                     virtio=virtio, pci=pci_board)
