"""virtio-net over virtio-pci with the stream (passt framing) back-end on a socketpair.

The "guest" is the simulated driver from tests/pci_driver.py; the "host"
is the other end of the socketpair speaking 4-byte big-endian length framing.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.pci.host import PciHost
from pyvmm.devices.virtio.device import Status
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.pci import VirtioPci
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.net.user import StreamBackend
from support.pci_driver import GuestPci, RecordingLine, Ring, VirtioPciDriver
from support.waiting import wait_until

VERSION_1 = 1 << 32
MAC = bytes.fromhex("525400123456")
RXBUF, TXBUF = 0x100000, 0x200000


@pytest.fixture(params=[False, True], ids=["plain", "mrg_rxbuf"])
def net(request):
    mrg = request.param
    mem = GuestMemory(64 << 20)
    io, mmio = Bus("io"), Bus("mmio")
    loop = MainLoop("net-test")
    loop.start_thread()
    host_sock, dev_sock = socket.socketpair()
    backend = StreamBackend(dev_sock, "test-stream")
    dev = VirtioNet(mem, backend, mac=MAC, loop=loop, queue_size=16, mrg_rxbuf=mrg)
    host = PciHost(mem, mmio, io, lambda g: RecordingLine(g))
    t = VirtioPci(dev, msix=False)
    slot = host.add(t)
    host.assign_resources()
    drv = VirtioPciDriver(GuestPci(io, mmio), slot)
    feats = drv.features()
    assert feats & (1 << 5) and feats & (1 << 16) and bool(feats & (1 << 15)) == mrg
    drv.init(VERSION_1 | (1 << 5) | (1 << 16) | ((1 << 15) if mrg else 0))
    rx, tx = Ring(mem, 0x10000, 16), Ring(mem, 0x20000, 16)
    drv.setup_queue(0, rx)
    drv.setup_queue(1, tx)
    drv.driver_ok()
    yield mem, dev, t, drv, rx, tx, host_sock, mrg
    loop.stop_thread()
    host.close()
    host_sock.close()
    mem.close()


def _send_from_host(sock, frame: bytes) -> None:
    sock.sendall(struct.pack(">I", len(frame)) + frame)


def _recv_on_host(sock, timeout=5.0) -> bytes:
    sock.settimeout(timeout)
    hdr = b""
    while len(hdr) < 4:
        hdr += sock.recv(4 - len(hdr))
    (n,) = struct.unpack(">I", hdr)
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


def test_config_space_mac_and_link(net):
    mem, dev, t, drv, rx, tx, host_sock, mrg = net
    assert bytes(drv.device_cfg(i, 1) for i in range(6)) == MAC
    assert drv.device_cfg(6, 2) == 1  # LINK_UP


def test_transmit_strips_header(net):
    mem, dev, t, drv, rx, tx, host_sock, mrg = net
    frame = bytes(range(60))
    mem.write(TXBUF, bytes(12) + frame[:20])
    mem.write(TXBUF + 0x1000, frame[20:])
    tx.add([(TXBUF, 32, False), (TXBUF + 0x1000, 40, False)])
    drv.kick(1)
    assert _recv_on_host(host_sock) == frame
    assert wait_until(lambda: tx.used_idx() == 1)
    # a chain shorter than the header is returned, not sent
    tx.add([(TXBUF, 4, False)])
    drv.kick(1)
    assert wait_until(lambda: tx.used_idx() == 2) and dev.stats["tx_dropped"] == 1


def test_receive_waits_for_buffers_and_adds_header(net):
    mem, dev, t, drv, rx, tx, host_sock, mrg = net
    frames = [bytes([i]) * (64 + i) for i in range(3)]
    for f in frames:
        _send_from_host(host_sock, f)
    time.sleep(0.1)
    assert rx.used_idx() == 0  # no buffers yet: frames wait in the device/socket
    for i in range(3):
        rx.add([(RXBUF + i * 0x1000, 1526, True)])
    drv.kick(0)
    assert wait_until(lambda: rx.used_idx() == 3)
    for i, f in enumerate(frames):
        head, n = rx.used_elem(i)
        assert n == 12 + len(f)
        data = mem.read(RXBUF + head * 0x1000, n)
        assert data[:10] == bytes(10) and struct.unpack_from("<H", data, 10)[0] == 1 and data[12:] == f
    assert t.intx_line.level and drv.isr() & 1


def test_receive_oversized_frame(net):
    mem, dev, t, drv, rx, tx, host_sock, mrg = net
    big = b"\xaa" * 3000
    _send_from_host(host_sock, big)
    for i in range(3):
        rx.add([(RXBUF + i * 0x1000, 1526, True)])
    drv.kick(0)
    if mrg:
        assert wait_until(lambda: rx.used_idx() == 2)
        (h0, n0), (h1, n1) = rx.used_elem(0), rx.used_elem(1)
        assert n0 + n1 == 12 + len(big)
        first = mem.read(RXBUF + h0 * 0x1000, n0)
        assert struct.unpack_from("<H", first, 10)[0] == 2
        assert first[12:] + mem.read(RXBUF + h1 * 0x1000, n1) == big
    else:
        assert wait_until(lambda: rx.used_idx() == 1)
        assert rx.used_elem(0)[1] == 0 and dev.stats["rx_dropped"] == 1
    # a normal frame after it still arrives
    _send_from_host(host_sock, b"\x01" * 60)
    assert wait_until(lambda: rx.used_idx() == (3 if mrg else 2))


def test_bad_rx_ring_needs_reset_not_crash(net):
    mem, dev, t, drv, rx, tx, host_sock, mrg = net
    # descriptor pointing outside guest RAM
    mem.write(rx.desc, struct.pack("<QIHH", 0xFFFF_0000_0000, 1526, 2, 0))
    mem.write_u16(rx.avail + 4, 0)
    mem.write_u16(rx.avail + 2, 1)
    _send_from_host(host_sock, b"\x02" * 60)
    drv.kick(0)
    assert wait_until(lambda: dev.status & Status.NEEDS_RESET)
    # host keeps sending; nothing breaks; reset brings the device back
    _send_from_host(host_sock, b"\x03" * 60)
    drv.common_write(0x14, 1, 0)
    assert wait_until(lambda: dev.status == 0)


def test_host_closes_socket(net):
    mem, dev, t, drv, rx, tx, host_sock, mrg = net
    rx.add([(RXBUF, 1526, True)])
    drv.kick(0)
    host_sock.shutdown(socket.SHUT_RDWR)
    time.sleep(0.1)
    mem.write(TXBUF, bytes(12) + b"x" * 60)
    tx.add([(TXBUF, 72, False)])
    drv.kick(1)
    assert wait_until(lambda: tx.used_idx() == 1)


def test_same_device_over_virtio_mmio():
    """VirtioNet is transport-neutral: the virtio-mmio transport drives it unchanged."""
    from pyvmm.devices.virtio.mmio import VirtioMmio

    mem = GuestMemory(16 << 20)
    loop = MainLoop("net-mmio")
    loop.start_thread()
    host_sock, dev_sock = socket.socketpair()
    dev = VirtioNet(mem, StreamBackend(dev_sock), mac=MAC, loop=loop, queue_size=16)
    line = RecordingLine(20)
    t = VirtioMmio(dev, line)
    try:
        assert t.io_read(0x008, 4) == 1 and bytes(t.io_read(0x100 + i, 1) for i in range(6)) == MAC
        for v in (1, 3):
            t.io_write(0x070, 4, v)
        t.io_write(0x024, 4, 1)
        t.io_write(0x020, 4, 1)  # VERSION_1
        t.io_write(0x070, 4, 0xB)
        rings = [Ring(mem, 0x10000, 16), Ring(mem, 0x20000, 16)]
        for q, ring in enumerate(rings):
            t.io_write(0x030, 4, q)
            t.io_write(0x038, 4, 16)
            for reg, addr in ((0x080, ring.desc), (0x090, ring.avail), (0x0A0, ring.used)):
                t.io_write(reg, 4, addr)
                t.io_write(reg + 4, 4, 0)
            t.io_write(0x044, 4, 1)
        t.io_write(0x070, 4, 0xF)
        rx, tx = rings
        rx.add([(RXBUF, 1526, True)])
        t.io_write(0x050, 4, 0)
        _send_from_host(host_sock, b"\x05" * 70)
        assert wait_until(lambda: rx.used_idx() == 1) and line.level
        assert mem.read(RXBUF + 12, 70) == b"\x05" * 70
        mem.write(TXBUF, bytes(12) + b"\x06" * 64)
        tx.add([(TXBUF, 76, False)])
        t.io_write(0x050, 4, 1)
        assert _recv_on_host(host_sock) == b"\x06" * 64
    finally:
        loop.stop_thread()
        t.close()
        host_sock.close()
        mem.close()


def test_hostile_rings_fuzz(net, caplog):
    """Random descriptor tables and indices: the device ends up fine or NEEDS_RESET, never raises."""
    import logging
    import random

    caplog.set_level(logging.ERROR, logger="pyvmm.loop")

    mem, dev, t, drv, rx, tx, host_sock, mrg = net
    rng = random.Random(11)
    for round_ in range(200):
        ring = rng.choice((rx, tx))
        for i in range(16):
            addr = rng.choice((RXBUF + rng.randrange(0x10000), rng.getrandbits(64), 0x3FFF_F000))
            mem.write(ring.desc + 16 * i, struct.pack("<QIHH", addr, rng.choice((0, 12, 64, 1526, 1 << 30,
                                                                              rng.getrandbits(32))),
                                                      rng.getrandbits(3), rng.randrange(20)))
        mem.write_u16(ring.avail + 4 + 2 * rng.randrange(16), rng.randrange(20))
        mem.write_u16(ring.avail + 2, rng.getrandbits(16))
        if rng.random() < 0.3:
            _send_from_host(host_sock, bytes(rng.randrange(14, 2000)))
        drv.kick(0 if ring is rx else 1)
        if round_ % 20 == 19:
            time.sleep(0.02)
            if dev.status & Status.NEEDS_RESET:
                drv.common_write(0x14, 1, 0)  # driver resets and sets the device up again
                drv.init(VERSION_1 | (1 << 5))
                drv.setup_queue(0, rx)
                drv.setup_queue(1, tx)
                drv.driver_ok()
    time.sleep(0.1)
    failures = [r for r in caplog.records if r.name == "pyvmm.loop" and r.levelno >= logging.ERROR]
    assert not failures, failures[0].getMessage()
