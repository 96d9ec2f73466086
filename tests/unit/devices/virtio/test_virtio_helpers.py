"""A small virtio driver written for the tests: builds split rings in a GuestMemory and talks
to a device through the virtio-mmio registers, as the Linux driver does.

(No tests here; other test_virtio_* / test_block_* modules import it.)
"""

from __future__ import annotations

import struct

from pyvmm.devices.virtio.device import Feature, Status
from pyvmm.devices.virtio.mmio import Reg, VirtioMmio
from pyvmm.memory import GuestMemory

DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4


class Alloc:
    """Bump allocator for guest-physical test buffers."""

    def __init__(self, start: int = 0x100000) -> None:
        self.next = start

    def __call__(self, size: int, align: int = 16) -> int:
        self.next = (self.next + align - 1) // align * align
        addr = self.next
        self.next += size
        return addr


class DriverQueue:
    def __init__(self, mem: GuestMemory, alloc: Alloc, index: int, size: int) -> None:
        self.mem, self.index, self.size = mem, index, size
        self.desc = alloc(16 * size, 4096)
        self.avail = alloc(6 + 2 * size, 2)
        self.used = alloc(6 + 8 * size, 4096)
        mem.fill(self.desc, 16 * size)
        mem.fill(self.avail, 6 + 2 * size)
        mem.fill(self.used, 6 + 8 * size)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Post a chain of (addr, len, device_writable) buffers; returns the head index."""
        ids = [self.free.pop(0) for _ in bufs]
        for k, ((addr, length, writable), i) in enumerate(zip(bufs, ids, strict=True)):
            last = k == len(bufs) - 1
            flags = (DESC_WRITE if writable else 0) | (0 if last else DESC_NEXT)
            self.write_desc(i, addr, length, flags, 0 if last else ids[k + 1])
        self.publish(ids[0])
        return ids[0]

    def add_indirect(self, table_addr: int, bufs: list[tuple[int, int, bool]]) -> int:
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (DESC_WRITE if writable else 0) | (0 if last else DESC_NEXT)
            self.mem.write(table_addr + 16 * k, struct.pack("<QIHH", addr, length, flags, 0 if last else k + 1))
        head = self.free.pop(0)
        self.write_desc(head, table_addr, 16 * len(bufs), DESC_INDIRECT, 0)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        while self.last_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)


class MmioDriver:
    """Drives one VirtioMmio through the full initialisation sequence."""

    def __init__(self, mem: GuestMemory, transport: VirtioMmio, alloc: Alloc | None = None) -> None:
        self.mem = mem
        self.t = transport
        self.alloc = alloc or Alloc()
        self.queues: list[DriverQueue] = []

    def rd(self, reg: int) -> int:
        return self.t.io_read(reg, 4)

    def wr(self, reg: int, value: int) -> None:
        self.t.io_write(reg, 4, value)

    def device_features(self) -> int:
        self.wr(Reg.DEVICE_FEATURES_SEL, 0)
        lo = self.rd(Reg.DEVICE_FEATURES)
        self.wr(Reg.DEVICE_FEATURES_SEL, 1)
        return lo | self.rd(Reg.DEVICE_FEATURES) << 32

    def negotiate(self, features: int | None = None) -> int:
        self.wr(Reg.STATUS, 0)
        self.wr(Reg.STATUS, Status.ACKNOWLEDGE)
        self.wr(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
        offered = self.device_features()
        feats = offered if features is None else features
        for word in (0, 1):
            self.wr(Reg.DRIVER_FEATURES_SEL, word)
            self.wr(Reg.DRIVER_FEATURES, (feats >> (32 * word)) & 0xFFFF_FFFF)
        self.wr(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        return self.rd(Reg.STATUS)

    def setup_queue(self, index: int, size: int) -> DriverQueue:
        q = DriverQueue(self.mem, self.alloc, index, size)
        self.wr(Reg.QUEUE_SEL, index)
        assert self.rd(Reg.QUEUE_READY) == 0
        assert self.rd(Reg.QUEUE_NUM_MAX) >= size
        self.wr(Reg.QUEUE_NUM, size)
        for lo, addr in ((Reg.QUEUE_DESC_LOW, q.desc), (Reg.QUEUE_DRIVER_LOW, q.avail),
                         (Reg.QUEUE_DEVICE_LOW, q.used)):
            self.wr(lo, addr & 0xFFFF_FFFF)
            self.wr(lo + 4, addr >> 32)
        self.wr(Reg.QUEUE_READY, 1)
        self.queues.append(q)
        return q

    def init(self, nqueues: int, size: int = 16, features: int | None = None) -> list[DriverQueue]:
        st = self.negotiate(features)
        assert st & Status.FEATURES_OK, "device refused the features"
        qs = [self.setup_queue(i, size) for i in range(nqueues)]
        self.wr(Reg.STATUS, self.rd(Reg.STATUS) | Status.DRIVER_OK)
        return qs

    def kick(self, index: int) -> None:
        self.wr(Reg.QUEUE_NOTIFY, index)

    def ack_interrupt(self) -> int:
        isr = self.rd(Reg.INTERRUPT_STATUS)
        self.wr(Reg.INTERRUPT_ACK, isr)
        return isr


def all_features_but(*bits: int, offered: int) -> int:
    out = offered
    for b in bits:
        out &= ~(1 << b)
    return out


FEATURE = Feature
