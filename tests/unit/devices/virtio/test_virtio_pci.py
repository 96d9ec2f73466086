"""virtio-pci transport, driven by a simulated guest driver through the buses (as Linux does it)."""

from __future__ import annotations

import random

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.pci.host import PciHost
from pyvmm.devices.virtio.device import Status
from pyvmm.devices.virtio.pci import VirtioPci
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from support.pci_driver import GuestPci, RecordingLine, Ring, VirtioPciDriver

VERSION_1 = 1 << 32


@pytest.fixture
def setup():
    mem = GuestMemory(64 << 20)
    io, mmio = Bus("io"), Bus("mmio")
    lines: dict[int, RecordingLine] = {}
    msis: list[tuple[int, int]] = []
    host = PciHost(mem, mmio, io, lambda g: lines.setdefault(g, RecordingLine(g)),
                   msi_sender=lambda a, d: msis.append((a, d)))
    yield mem, io, mmio, host, msis
    host.close()
    mem.close()


def _plug(mem, host, msix: bool) -> tuple[VirtioPci, int]:
    t = VirtioPci(VirtioRng(mem), msix=msix, msi_sender=host.send_msi if msix else None)
    slot = host.add(t)
    host.assign_resources()
    return t, slot


def test_identity_and_caps(setup):
    mem, io, mmio, host, msis = setup
    t, slot = _plug(mem, host, msix=True)
    pci = GuestPci(io, mmio)
    assert pci.enumerate()[slot] == (0x1AF4, 0x1044)
    assert pci.cfg_read(slot, 0x08, 1) == 1  # revision 1: modern
    assert pci.cfg_read(slot, 0x2C) == 0x1100_1AF4
    ids = [c for _, c in pci.caps(slot)]
    assert ids.count(0x09) == 5 and 0x11 in ids
    drv = VirtioPciDriver(pci, slot)
    assert set(drv.regions) == {1, 2, 3, 4} and drv.notify_mult == 4
    assert drv.common_read(0x12, 2) == 1  # one queue
    assert drv.features() & VERSION_1


@pytest.mark.parametrize("msix", [True, False])
def test_rng_request_over_pci(setup, msix):
    mem, io, mmio, host, msis = setup
    t, slot = _plug(mem, host, msix)
    pci = GuestPci(io, mmio)
    drv = VirtioPciDriver(pci, slot)
    if msix:
        cap = next(off for off, c in pci.caps(slot) if c == 0x11)
        pci.cfg_write(slot, cap + 2, 2, 0x8000)
        table = t.mapped_bars()[1]
        mmio.write(table + 0, 4, 0xFEE0_0000)
        mmio.write(table + 8, 4, 0x31)
        mmio.write(table + 12, 4, 0)
    drv.init(VERSION_1)
    drv.common_write(0x10, 2, 5)  # config vector beyond the table -> NO_VECTOR
    assert drv.common_read(0x10, 2) == 0xFFFF
    ring = Ring(mem, 0x10000, 16)
    drv.setup_queue(0, ring, vector=0 if msix else 0xFFFF)
    assert drv.common_read(0x1A, 2) == (0 if msix else 0xFFFF)
    drv.driver_ok()
    assert t.device.status & Status.DRIVER_OK
    ring.add([(0x20000, 64, True)])
    drv.kick(0)
    assert ring.used_idx() == 1 and ring.used_elem(0) == (0, 64)
    assert mem.read(0x20000, 64) != bytes(64)
    if msix:
        assert msis == [(0xFEE0_0000, 0x31)] and not t.intx_line.level
    else:
        assert t.intx_line.level
        assert drv.isr() == 1 and not t.intx_line.level and drv.isr() == 0
    # reset through the status register: queues off, vectors reset
    drv.common_write(0x14, 1, 0)
    assert drv.common_read(0x14, 1) == 0 and not t.device.queues[0].ready
    assert drv.common_read(0x1A, 2) == 0xFFFF


def test_bad_ring_needs_reset_and_hostile_registers(setup):
    mem, io, mmio, host, msis = setup
    t, slot = _plug(mem, host, msix=False)
    drv = VirtioPciDriver(GuestPci(io, mmio), slot)
    drv.init(VERSION_1)
    drv.common_write(0x16, 2, 0)
    drv.common_write(0x20, 4, 0xFFFF_0000)  # descriptor table outside RAM
    drv.common_write(0x1C, 2, 1)
    assert drv.common_read(0x1C, 2) == 0 and t.device.status & Status.NEEDS_RESET
    # out-of-range queue select, wrong widths, unknown offsets
    drv.common_write(0x16, 2, 7)
    assert drv.common_read(0x18, 2) == 0
    drv.common_write(0x1C, 2, 1)
    drv.common_write(0x14, 4, 0xFF)  # status is a byte register
    assert drv.common_read(0x13, 1) == 0
    drv.kick(0)
    mmio.write(drv.regions[2] + 4 * 40, 2, 40)  # notify for a queue that does not exist
    mmio.write(drv.regions[2] + 1, 1, 0)
    # reset recovers
    drv.common_write(0x14, 1, 0)
    assert t.device.status == 0


def test_pci_cfg_capability_window(setup):
    mem, io, mmio, host, msis = setup
    t, slot = _plug(mem, host, msix=False)
    pci = GuestPci(io, mmio)
    cap = next(off for off, c in pci.caps(slot) if c == 0x09 and pci.cfg_read(slot, off + 3, 1) == 5)
    pci.cfg_write(slot, cap + 4, 1, 4)  # BAR 4
    pci.cfg_write(slot, cap + 8, 4, 0x12)  # num_queues
    pci.cfg_write(slot, cap + 12, 4, 2)
    assert pci.cfg_read(slot, cap + 16, 2) == 1
    pci.cfg_write(slot, cap + 8, 4, 0xFFFF_FFF0)  # outside the BAR: no access
    assert pci.cfg_read(slot, cap + 16, 2) in (0, 1)


def test_register_fuzz(setup):
    """Random writes to every register window never raise (device may end up NEEDS_RESET)."""
    mem, io, mmio, host, msis = setup
    t, slot = _plug(mem, host, msix=True)
    rng = random.Random(7)
    bars = t.mapped_bars()
    for _ in range(20000):
        bar = rng.choice(list(bars))
        off = rng.randrange(0x4000 if bar == 4 else 0x1000)
        size = rng.choice((1, 2, 4, 8))
        if rng.random() < 0.6:
            mmio.write(bars[bar] + off, size, rng.getrandbits(64))
        else:
            mmio.read(bars[bar] + off, size)
        if t.mapped_bars() != bars:  # nothing on the BARs can move the BARs
            raise AssertionError("BARs moved")


class RecordingIoEventFds:
    """An ioeventfd capability that records registrations (the real KVM one is covered in test_pci_kvm)."""

    def __init__(self):
        self.live: set[tuple[int, int]] = set()

    def register_ioeventfd(self, fd, addr, length, *, pio, datamatch=None):
        assert length == 2 and not pio and datamatch is None
        assert (fd, addr) not in self.live
        self.live.add((fd, addr))

    def unregister_ioeventfd(self, fd, addr, length, *, pio, datamatch=None):
        assert length == 2 and not pio and datamatch is None
        assert (fd, addr) in self.live
        self.live.remove((fd, addr))


def test_ioeventfds_follow_bar_moves(setup):
    import os

    from pyvmm.loop import MainLoop

    mem, io, mmio, host, msis = setup
    t, slot = _plug(mem, host, msix=False)
    vm = RecordingIoEventFds()
    loop = MainLoop("kick")
    loop.start_thread()
    try:
        t.attach_ioeventfds(vm, loop)
        base = t.mapped_bars()[4]
        assert {a for _, a in vm.live} == {base + 0x3000}
        pci = GuestPci(io, mmio)
        pci.cfg_write(slot, 0x20, 4, 0xD000_0000)  # guest moves BAR 4
        assert {a for _, a in vm.live} == {0xD000_3000}
        pci.cfg_write(slot, 0x04, 2, 0)  # decoding off: nothing registered
        assert vm.live == set()
        pci.cfg_write(slot, 0x04, 2, 2)
        assert {a for _, a in vm.live} == {0xD000_3000}
        # a signalled eventfd runs the queue on the loop, like a notify write
        drv = VirtioPciDriver(pci, slot)
        drv.init(VERSION_1)
        ring = Ring(mem, 0x10000, 16)
        drv.setup_queue(0, ring)
        drv.driver_ok()
        ring.add([(0x20000, 32, True)])
        os.eventfd_write(next(iter(vm.live))[0], 1)
        for _ in range(500):
            if ring.used_idx() == 1:
                break
            import time
            time.sleep(0.01)
        assert ring.used_idx() == 1
    finally:
        loop.stop_thread()
