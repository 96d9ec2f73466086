"""Hostile-guest bounds (issue 11): host cost per request, IOV_MAX, no tracebacks, ring rewrites.

Each test drives a device with crafted rings in a GuestMemory through the test driver, as a
hostile guest would, and checks what the host pays and what it logs.
"""

from __future__ import annotations

import logging
import struct
import tracemalloc

import pytest
from test_virtio_helpers import DESC_INDIRECT, DESC_NEXT, DESC_WRITE, Alloc, MmioDriver

from pyvmm.devices.virtio.console import VirtioConsole
from pyvmm.devices.virtio.device import Status
from pyvmm.devices.virtio.mmio import Isr, Reg, VirtioMmio
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit import BURST
from support.recording import CountingBackend

LOGGER = "pyvmm.devices.virtio"


def _records(caplog, level=logging.WARNING):
    return [r for r in caplog.records if r.levelno >= level]


def _no_traceback(records):
    return all(r.exc_info is None and r.exc_text is None for r in records)


# -- bounded host cost -------------------------------------------------------------------------------
def test_console_255mib_chain_is_sent_in_pieces_without_a_chain_sized_copy():
    mem = GuestMemory(320 << 20)
    try:
        be = CountingBackend()
        dev = VirtioConsole(mem, be, queue_size=128)  # type: ignore[arg-type]
        t = VirtioMmio(dev, None)
        d = MmioDriver(mem, t)
        _rxq, txq = d.init(2, 128)
        piece = 2 << 20
        bufs = [(0x1000000 + i * piece, piece, False) for i in range(127)]
        bufs.append((0x1000000 + 127 * piece, piece - 4096, False))
        total = sum(n for _, n, _ in bufs)
        assert total > 255 << 20
        head = txq.add(bufs)
        tracemalloc.start()
        try:
            d.kick(1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert txq.get_used() == [(head, 0)]
        assert be.bytes == total
        assert be.largest <= 64 << 10, be.largest
        assert peak < 4 << 20, f"peak host allocation {peak >> 20} MiB for one chain"
        t.close()
    finally:
        mem.close()


def _rng(queue_size: int = 64) -> tuple[GuestMemory, VirtioRng, VirtioMmio, MmioDriver]:
    mem = GuestMemory(16 << 20)
    dev = VirtioRng(mem, queue_size=queue_size)
    t = VirtioMmio(dev, None)
    return mem, dev, t, MmioDriver(mem, t)


def test_rng_chain_of_more_than_iov_max_buffers_is_filled(caplog):
    mem, dev, t, d = _rng(queue_size=2048)
    (q,) = d.init(1, 2048)
    base = d.alloc(1500 * 8)
    head = q.add([(base + 8 * i, 8, True) for i in range(1500)])
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        d.kick(0)
    assert not dev.status & Status.NEEDS_RESET, dev.broken_reason
    assert q.get_used() == [(head, 1500 * 8)]
    data = mem.read(base, 1500 * 8)
    assert data[-8:] != bytes(8) and data[:8] != bytes(8)
    assert not _records(caplog)
    t.close()
    mem.close()


def test_rng_indirect_table_past_the_limit_is_needs_reset_in_one_line(caplog):
    mem, dev, t, d = _rng()
    (q,) = d.init(1, 8)
    table, buf = d.alloc(16 * 1500), d.alloc(1500)
    for k in range(1500):
        last = k == 1499
        mem.write(table + 16 * k, struct.pack("<QIHH", buf + k, 1, DESC_WRITE | (0 if last else DESC_NEXT),
                                              0 if last else k + 1))
    head = q.free.pop(0)
    q.write_desc(head, table, 16 * 1500, DESC_INDIRECT, 0)
    q.publish(head)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        d.kick(0)
    assert dev.status & Status.NEEDS_RESET
    assert "indirect table of 1500 descriptors" in dev.broken_reason
    recs = _records(caplog)
    assert len(recs) == 1 and _no_traceback(recs), [r.getMessage() for r in recs]
    assert t.io_read(Reg.INTERRUPT_STATUS, 4) & Isr.CONFIG_CHANGE
    t.close()
    mem.close()


# -- no traceback paths ----------------------------------------------------------------------------
def test_handler_failure_is_needs_reset_with_a_config_interrupt_and_one_line(caplog):
    mem, dev, t, d = _rng()
    (q,) = d.init(1, 8)
    dev._fd = -1  # the back-end fails: readv raises EBADF  # noqa: SLF001
    buf = d.alloc(64)
    q.add([(buf, 64, True)])
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        d.kick(0)
    assert t.io_read(Reg.STATUS, 4) & Status.NEEDS_RESET
    assert "handler failed: OSError" in dev.broken_reason
    assert t.io_read(Reg.INTERRUPT_STATUS, 4) & Isr.CONFIG_CHANGE
    recs = _records(caplog)
    assert len(recs) == 1 and "\n" not in recs[0].getMessage(), [r.getMessage() for r in recs]
    assert _no_traceback(_records(caplog, logging.INFO))
    # Kicks after that do nothing and log nothing more; a driver reset recovers the device.
    d.kick(0)
    assert len(_records(caplog)) == 1
    t.close()
    mem.close()


class FrameBackend:
    """A net back-end that hands out queued frames (no loop needed)."""

    vnet_hdr_len = 0

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = list(frames)
        self.read_interest = True

    def start(self, loop, on_readable) -> None:
        pass

    def set_read_interest(self, enabled: bool) -> None:
        self.read_interest = enabled

    def recv(self) -> bytes | None:
        return self.frames.pop(0) if self.frames else None

    def send(self, frame: bytes) -> bool:
        return True

    def close(self) -> None:
        pass


class RollbackMemory:
    """The guest's view of RAM, rewriting avail->idx back by one right after the device reads it."""

    def __init__(self, mem: GuestMemory, idx_addr: int) -> None:
        self._mem, self._addr = mem, idx_addr
        self.armed = False

    def read_u16(self, addr: int) -> int:
        value = self._mem.read_u16(addr)
        if self.armed and addr == self._addr:
            self.armed = False
            self._mem.write_u16(addr, (value - 1) & 0xFFFF)  # the guest rolls the index back
        return value

    def __getattr__(self, name: str):
        return getattr(self._mem, name)


@pytest.mark.parametrize("mrg", [False, True], ids=["plain", "mrg_rxbuf"])
def test_net_rx_tolerates_avail_idx_rolled_back_between_reads(caplog, mrg):
    mem = GuestMemory(16 << 20)
    frame = bytes(range(256)) * 4
    be = FrameBackend([frame])
    dev = VirtioNet(mem, be, mac=bytes.fromhex("525400123456"), mrg_rxbuf=mrg)  # type: ignore[arg-type]
    t = VirtioMmio(dev, None)
    d = MmioDriver(mem, t)
    rxq, _txq = d.init(2, 16)
    buf = d.alloc(2048)
    rxq.add([(buf, 2048, True)])
    spy = RollbackMemory(mem, rxq.avail + 2)
    dev.queues[0].memory = spy  # type: ignore[assignment]
    spy.armed = True
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        dev.backend_readable()
    assert not dev.status & Status.NEEDS_RESET, dev.broken_reason
    assert _no_traceback(caplog.records), [r.getMessage() for r in caplog.records]
    assert not _records(caplog)
    # The frame is delivered (it saw the buffer) or kept for the next buffer: never lost to an error.
    mem.write_u16(rxq.avail + 2, 1)  # the guest puts its index back
    d.kick(0)
    used = rxq.get_used()
    assert len(used) == 1 and used[0][1] == 12 + len(frame), used
    assert mem.read(buf + 12, len(frame)) == frame
    assert not dev.status & Status.NEEDS_RESET
    t.close()
    mem.close()


# -- rate-limited guest-triggered logging -------------------------------------------------------------
def test_guest_needs_reset_loop_logs_a_bounded_number_of_lines(caplog):
    mem, dev, t, d = _rng()
    with caplog.at_level(logging.INFO):
        for _ in range(2000):
            (q,) = d.init(1, 8)  # status 0 (device reset), then the handshake
            mem.write_u16(q.avail + 2, 200)  # an index far ahead of the queue size: NEEDS_RESET
            d.kick(0)
            assert dev.status & Status.NEEDS_RESET
            d.queues.clear()
            d.alloc = Alloc()
    recs = _records(caplog)
    assert BURST <= len(recs) <= BURST + 1, len(recs)
    assert _no_traceback(recs)
    t.close()
    mem.close()
