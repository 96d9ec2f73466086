"""virtio-mmio register semantics (virtio 1.x section 4.2.2), driven through io_read/io_write."""

from __future__ import annotations

import pytest
from test_virtio_helpers import Alloc, MmioDriver

from pyvmm.devices.virtio.device import DeviceId, Feature, Status
from pyvmm.devices.virtio.mmio import MAGIC, Reg, VirtioMmio
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.irq import IrqLine
from pyvmm.memory import GuestMemory
from support.recording import RecordingSink


@pytest.fixture
def setup():
    mem = GuestMemory(16 << 20)
    sink = RecordingSink()
    line = IrqLine(sink, 20)
    dev = VirtioRng(mem)
    t = VirtioMmio(dev, line)
    yield mem, t, dev, line, sink
    t.close()
    mem.close()


def test_identification_registers(setup):
    _mem, t, _dev, _line, _sink = setup
    assert t.io_read(Reg.MAGIC, 4) == MAGIC == 0x74726976
    assert t.io_read(Reg.VERSION, 4) == 2
    assert t.io_read(Reg.DEVICE_ID, 4) == DeviceId.RNG == 4
    assert t.io_read(Reg.VENDOR_ID, 4) != 0
    # sub-word accesses to the common registers are ignored / read 0
    assert t.io_read(Reg.MAGIC, 2) == 0


def test_feature_select_and_negotiation(setup):
    mem, t, dev, _line, _sink = setup
    d = MmioDriver(mem, t)
    feats = d.device_features()
    assert feats >> Feature.VERSION_1 & 1
    assert feats >> Feature.EVENT_IDX & 1
    assert feats >> Feature.INDIRECT_DESC & 1
    t.io_write(Reg.DEVICE_FEATURES_SEL, 4, 7)
    assert t.io_read(Reg.DEVICE_FEATURES, 4) == 0  # no such feature page

    # the handshake: an unoffered bit makes the device clear FEATURES_OK
    st = d.negotiate(feats | (1 << 40))
    assert not st & Status.FEATURES_OK
    # without VERSION_1 (a legacy driver) too
    st = d.negotiate(feats & ~(1 << Feature.VERSION_1))
    assert not st & Status.FEATURES_OK
    st = d.negotiate(1 << Feature.VERSION_1)
    assert st & Status.FEATURES_OK
    assert dev.driver_features == 1 << Feature.VERSION_1
    # after FEATURES_OK the driver features are frozen
    t.io_write(Reg.DRIVER_FEATURES_SEL, 4, 0)
    t.io_write(Reg.DRIVER_FEATURES, 4, 1 << Feature.EVENT_IDX)
    assert dev.driver_features == 1 << Feature.VERSION_1


def test_queue_setup_and_ready(setup):
    mem, t, dev, _line, _sink = setup
    d = MmioDriver(mem, t)
    d.negotiate()
    t.io_write(Reg.QUEUE_SEL, 4, 0)
    assert t.io_read(Reg.QUEUE_NUM_MAX, 4) == 64
    t.io_write(Reg.QUEUE_SEL, 4, 5)
    assert t.io_read(Reg.QUEUE_NUM_MAX, 4) == 0  # queue does not exist
    q = d.setup_queue(0, 8)
    assert t.io_read(Reg.QUEUE_READY, 4) == 1
    assert t.io_read(Reg.QUEUE_DESC_LOW, 4) == q.desc
    assert t.io_read(Reg.QUEUE_DEVICE_LOW, 4) == q.used
    assert dev.queues[0].size == 8
    # a live queue ignores address changes
    t.io_write(Reg.QUEUE_DESC_LOW, 4, 0x1000)
    assert dev.queues[0].desc_addr == q.desc
    # status 0 resets everything
    t.io_write(Reg.STATUS, 4, 0)
    assert t.io_read(Reg.STATUS, 4) == 0
    assert t.io_read(Reg.QUEUE_READY, 4) == 0
    assert dev.driver_features == 0


@pytest.mark.parametrize("what", ["misaligned", "outside", "badsize"])
def test_bad_ring_at_ready_sets_needs_reset(setup, what):
    mem, t, dev, _line, _sink = setup
    d = MmioDriver(mem, t)
    d.negotiate()
    t.io_write(Reg.STATUS, 4, t.io_read(Reg.STATUS, 4) | Status.DRIVER_OK)
    t.io_write(Reg.QUEUE_SEL, 4, 0)
    t.io_write(Reg.QUEUE_NUM, 4, 6 if what == "badsize" else 8)
    desc = {"misaligned": 0x10008, "outside": 0x7FFF_F000}.get(what, 0x10000)
    t.io_write(Reg.QUEUE_DESC_LOW, 4, desc)
    t.io_write(Reg.QUEUE_DRIVER_LOW, 4, 0x20000)
    t.io_write(Reg.QUEUE_DEVICE_LOW, 4, 0x30000)
    t.io_write(Reg.QUEUE_READY, 4, 1)
    assert t.io_read(Reg.QUEUE_READY, 4) == 0
    assert t.io_read(Reg.STATUS, 4) & Status.NEEDS_RESET
    assert t.io_read(Reg.INTERRUPT_STATUS, 4) & 2  # configuration change
    assert dev.broken_reason
    # the driver resets; NEEDS_RESET goes away
    t.io_write(Reg.STATUS, 4, 0)
    assert t.io_read(Reg.STATUS, 4) == 0
    assert t.io_read(Reg.INTERRUPT_STATUS, 4) == 0


def test_interrupt_status_ack_and_level_line(setup):
    mem, t, _dev, line, sink = setup
    d = MmioDriver(mem, t, Alloc())
    (q,) = d.init(1, 8)
    buf = d.alloc(32)
    q.add([(buf, 32, True)])
    d.kick(0)
    assert q.get_used() == [(0, 32)]
    assert t.io_read(Reg.INTERRUPT_STATUS, 4) == 1
    assert line.level and sink.events == [(20, True)]
    t.io_write(Reg.INTERRUPT_ACK, 4, 1)
    assert t.io_read(Reg.INTERRUPT_STATUS, 4) == 0
    assert not line.level and sink.events[-1] == (20, False)


def test_config_generation_and_config_space(setup):
    mem, t, dev, _line, _sink = setup
    from pyvmm.devices.virtio.blk import VirtioBlk

    class Img:
        path, size, read_only = "x", 1 << 20, True

        def close(self):
            pass

    blk = VirtioBlk(mem, Img())  # type: ignore[arg-type]
    tb = VirtioMmio(blk, None)
    assert tb.io_read(Reg.DEVICE_ID, 4) == 2
    assert tb.io_read(0x100, 4) == (1 << 20) // 512  # capacity, low word
    assert tb.io_read(0x104, 4) == 0
    assert tb.io_read(0x100 + 20, 4) == 512  # blk_size
    assert tb.io_read(0x100 + 8, 4) == 1 << 20  # size_max
    assert tb.io_read(0x100 + 12, 4) == 254  # seg_max
    assert tb.io_read(0x100, 1) == ((1 << 20) // 512) & 0xFF
    assert tb.io_read(0x100 + 4096, 4) == 0  # past the config space
    gen = tb.io_read(Reg.CONFIG_GENERATION, 4)
    blk.config_changed()
    assert tb.io_read(Reg.CONFIG_GENERATION, 4) == gen + 1
    feats = MmioDriver(mem, tb).device_features()
    assert feats >> 5 & 1  # VIRTIO_BLK_F_RO


def test_shm_registers_report_no_region(setup):
    _mem, t, _dev, _line, _sink = setup
    assert t.io_read(Reg.SHM_LEN_LOW, 4) == 0xFFFF_FFFF
    assert t.io_read(Reg.SHM_LEN_HIGH, 4) == 0xFFFF_FFFF


def test_machine_reset_lowers_line(setup):
    mem, t, dev, line, _sink = setup
    d = MmioDriver(mem, t)
    (q,) = d.init(1, 8)
    q.add([(d.alloc(16), 16, True)])
    d.kick(0)
    assert line.level
    t.reset()
    assert not line.level
    assert dev.status == 0 and not dev.queues[0].ready


def test_eventfd_irq_line_level_semantics():
    """What KVM sees through an irqfd with resample: one signal per rising edge, and a re-signal
    at EOI (resample) only while the level is still high."""
    import os

    from pyvmm.devices.virtio.mmio import EventfdIrqLine
    from pyvmm.loop import MainLoop

    loop = MainLoop("irqfd-test")  # not running: _on_resample is called by hand

    def signals(line) -> int:
        try:
            return os.eventfd_read(line.irqfd)
        except BlockingIOError:
            return 0

    line = EventfdIrqLine(loop)
    try:
        line.set_level(True)
        line.set_level(True)  # already high: no second edge
        assert signals(line) == 1
        os.eventfd_write(line.resample_fd, 1)  # guest EOI while still pending
        line._on_resample()
        assert signals(line) == 1
        line.set_level(False)
        os.eventfd_write(line.resample_fd, 1)  # EOI after the ACK: stays quiet
        line._on_resample()
        assert signals(line) == 0
    finally:
        line.close()
        loop.close()


def test_wired_or_shared_line():
    from pyvmm.devices.virtio.board import WiredOr

    sink = RecordingSink()
    wired = WiredOr(IrqLine(sink, 20))
    a, b = wired.source(), wired.source()
    a.set_level(True)
    b.set_level(True)
    a.set_level(False)  # b still pending: the line must stay high
    assert sink.events == [(20, True)]
    b.set_level(False)
    assert sink.events == [(20, True), (20, False)]


def test_board_shares_gsis_round_robin():
    from pyvmm.bus import Bus
    from pyvmm.devices.virtio.board import MAX_DEVICES, VirtioMmioBoard
    from pyvmm.errors import ConfigError
    from pyvmm.irq import IrqRouter

    mem = GuestMemory(4 << 20)
    router = IrqRouter()
    sink = RecordingSink()
    router.attach(sink)
    board = VirtioMmioBoard(mem, Bus("mmio"), router.line)
    try:
        ts = [board.add(VirtioRng(mem)) for _ in range(MAX_DEVICES)]
        with pytest.raises(ConfigError, match="too many"):
            board.add(VirtioRng(mem))
        acpi = board.acpi_devices()
        assert [d.gsi for d in acpi] == [20, 21, 22, 23, 20, 21, 22, 23]
        assert len({d.name for d in acpi}) == MAX_DEVICES and acpi[4].mmio_base == 0xFEB00800
        ts[0].queue_interrupt(0)
        ts[4].queue_interrupt(0)
        ts[0].io_write(Reg.INTERRUPT_ACK, 4, 1)
        assert router.line(20).level  # device 4 still asserts the shared line
        ts[4].io_write(Reg.INTERRUPT_ACK, 4, 1)
        assert not router.line(20).level
    finally:
        board.close()
        mem.close()
