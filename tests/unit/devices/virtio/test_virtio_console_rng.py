"""virtio-rng and virtio-console through virtio-mmio with the test driver."""

from __future__ import annotations

import os
import time

import pytest
from test_virtio_helpers import MmioDriver

from pyvmm.chardev import parse_chardev
from pyvmm.devices.virtio.console import PENDING_MAX, VirtioConsole
from pyvmm.devices.virtio.mmio import Reg, VirtioMmio
from pyvmm.devices.virtio.rng import MAX_BYTES_PER_REQUEST, VirtioRng
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl
from support.chardev_helpers import RecordingBackend


@pytest.fixture
def mem():
    m = GuestMemory(4 << 20)
    yield m
    m.close()


def test_rng_fills_buffers(mem):
    dev = VirtioRng(mem)
    t = VirtioMmio(dev, None)
    d = MmioDriver(mem, t)
    (q,) = d.init(1, 8)
    a, b = d.alloc(64), d.alloc(200)
    head = q.add([(a, 64, True), (b, 200, True)])
    d.kick(0)
    assert q.get_used() == [(head, 264)]
    assert mem.read(a, 64) != bytes(64) and mem.read(b, 200) != bytes(200)
    # a huge request is capped
    big = d.alloc(MAX_BYTES_PER_REQUEST * 2)
    head = q.add([(big, MAX_BYTES_PER_REQUEST * 2, True)])
    d.kick(0)
    assert q.get_used() == [(head, MAX_BYTES_PER_REQUEST)]
    assert d.device_features() & 0xFFFF_FFFF == (1 << 28) | (1 << 29)  # no device-specific bits
    t.close()


def test_console_output_and_input(mem):
    be = RecordingBackend()
    dev = VirtioConsole(mem, be)  # type: ignore[arg-type]
    t = VirtioMmio(dev, None)
    assert t.io_read(Reg.DEVICE_ID, 4) == 3
    d = MmioDriver(mem, t)
    rxq, txq = d.init(2, 8)
    # output
    s = d.alloc(32)
    mem.write(s, b"hello hvc0\n")
    head = txq.add([(s, 11, False)])
    d.kick(1)
    assert be.out == b"hello hvc0\n" and txq.get_used() == [(head, 0)]
    # input before any receive buffer waits in the device
    be.receiver.receive(b"abc")
    assert rxq.get_used() == []
    r = d.alloc(2)
    head = rxq.add([(r, 2, True)])
    d.kick(0)
    assert rxq.get_used() == [(head, 2)] and mem.read(r, 2) == b"ab"
    r2 = d.alloc(16)
    head = rxq.add([(r2, 16, True)])
    d.kick(0)
    assert rxq.get_used() == [(head, 1)] and mem.read(r2, 1) == b"c"
    # back-pressure: the pending buffer fills, then drains and the back-end is resumed
    assert be.receiver.can_receive() == PENDING_MAX
    be.receiver.receive(b"x" * PENDING_MAX)
    assert be.receiver.can_receive() == 0
    r3 = d.alloc(PENDING_MAX)
    rxq.add([(r3, PENDING_MAX, True)])
    d.kick(0)
    assert be.accept_calls >= 1 and be.receiver.can_receive() == PENDING_MAX
    # emergency write through config space
    t.io_write(0x100 + 8, 4, ord("!"))
    assert be.out.endswith(b"!")


def test_console_with_real_chardev_file(mem, tmp_path):
    loop = MainLoop("console-test")
    loop.start_thread()
    try:
        out = tmp_path / "console.out"
        be = parse_chardev(f"file:{out}", loop, VmControl(), label="vcon")
        dev = VirtioConsole(mem, be, loop=loop)
        t = VirtioMmio(dev, None)
        d = MmioDriver(mem, t)
        _rxq, txq = d.init(2, 8)
        s = d.alloc(32)
        mem.write(s, b"via chardev\n")
        txq.add([(s, 12, False)])
        d.kick(1)
        deadline = time.monotonic() + 5
        while txq.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        t.close()
        assert os.path.exists(out) and out.read_bytes() == b"via chardev\n"
    finally:
        loop.stop_thread()
        loop.close()


def test_console_idle_receive_buffers_do_not_spin(mem):
    loop = MainLoop("console-spin")
    loop.start_thread()
    try:
        be = RecordingBackend()
        dev = VirtioConsole(mem, be, loop=loop)  # type: ignore[arg-type]
        t = VirtioMmio(dev, None)
        d = MmioDriver(mem, t)
        rxq, _txq = d.init(2, 8)
        calls = []
        orig = dev.handle_queue
        dev.handle_queue = lambda q: (calls.append(q.index), orig(q))  # type: ignore[method-assign]
        rxq.add([(d.alloc(64), 64, True)])
        d.kick(0)
        time.sleep(0.2)
        assert calls == [0]  # handled once, not re-posted forever
        loop.call_soon_threadsafe(lambda: be.receiver.receive(b"hi"))
        deadline = time.monotonic() + 5
        while rxq.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert rxq.get_used()[0][1] == 2
    finally:
        loop.stop_thread()
        loop.close()
