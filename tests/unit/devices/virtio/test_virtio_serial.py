"""virtio-serial multiport: the control handshake, named ports and open/close events, checked bounds."""

from __future__ import annotations

import struct

import pytest
from test_virtio_helpers import MmioDriver

from pyvmm.devices.virtio.mmio import VirtioMmio
from pyvmm.devices.virtio.serial import Event, SerialPort, VirtioSerial, port_queues, queue_port
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from support.chardev_helpers import RecordingBackend

CTRL = struct.Struct("<IHH")


@pytest.fixture
def mem():
    m = GuestMemory(4 << 20)
    yield m
    m.close()


def test_queue_numbering_matches_the_spec() -> None:
    assert port_queues(0) == (0, 1) and port_queues(1) == (4, 5) and port_queues(2) == (6, 7)
    assert queue_port(2) is None and queue_port(3) is None
    assert queue_port(5) == (1, True) and queue_port(0) == (0, False)


def test_port_numbers_follow_qemus_rules(mem) -> None:
    dev = VirtioSerial(mem, max_ports=3)
    assert dev.add_port(SerialPort(None, name="a")).nr == 1  # 0 is kept for a virtconsole
    assert dev.add_port(SerialPort(None, console=True)).nr == 0
    with pytest.raises(ConfigError, match="already exists by name a"):
        dev.add_port(SerialPort(None, name="a"))
    with pytest.raises(ConfigError, match="reserved for virtconsole"):
        dev.add_port(SerialPort(None, name="b"), 0)
    assert dev.add_port(SerialPort(None, name="b")).nr == 2
    with pytest.raises(ConfigError, match="Out of port numbers"):
        dev.add_port(SerialPort(None, name="c"))


def _control_messages(mem, rxq, bufs) -> list[tuple[int, int, int, bytes]]:
    out = []
    for head, n in rxq.get_used():
        raw = mem.read(bufs[head], n)
        out.append((*CTRL.unpack(raw[:8]), raw[8:]))
    return out


def test_handshake_names_and_open_events(mem) -> None:
    be = RecordingBackend()
    dev = VirtioSerial(mem, max_ports=2)
    port = dev.add_port(SerialPort(be, name="org.qemu.guest_agent.0"))  # type: ignore[arg-type]
    t = VirtioMmio(dev, None)
    d = MmioDriver(mem, t)
    qs = d.init(6, 8)
    c_rx, c_tx, p_rx, p_tx = qs[2], qs[3], qs[4], qs[5]
    bufs = {}
    for _ in range(8):
        a = d.alloc(64)
        bufs[c_rx.add([(a, 64, True)])] = a

    def send(ident: int, event: int, value: int) -> None:
        a = d.alloc(8)
        mem.write(a, CTRL.pack(ident, event, value))
        c_tx.add([(a, 8, False)])
        d.kick(3)

    send(0xFFFF_FFFF, Event.DEVICE_READY, 1)
    assert _control_messages(mem, c_rx, bufs) == [(1, Event.PORT_ADD, 1, b"")]
    send(1, Event.PORT_READY, 1)
    assert _control_messages(mem, c_rx, bufs) == [(1, Event.PORT_NAME, 1, b"org.qemu.guest_agent.0"),
                                                   (1, Event.PORT_OPEN, 1, b"")]
    # host input waits until a guest program opens the port
    be.receiver.receive(b"{}\n")
    r = d.alloc(32)
    head = p_rx.add([(r, 32, True)])
    d.kick(4)
    assert p_rx.get_used() == []
    send(1, Event.PORT_OPEN, 1)
    assert p_rx.get_used() == [(head, 3)] and mem.read(r, 3) == b"{}\n"
    # guest output
    s = d.alloc(8)
    mem.write(s, b"reply\n")
    p_tx.add([(s, 6, False)])
    d.kick(5)
    assert be.out == b"reply\n"
    # the host side leaves and comes back: PORT_OPEN 0, then 1
    port.host_open_changed(False)
    port.host_open_changed(True)
    assert _control_messages(mem, c_rx, bufs) == [(1, Event.PORT_OPEN, 0, b""), (1, Event.PORT_OPEN, 1, b"")]
    # guest nonsense: unknown ports, short messages; nothing answers, nothing breaks
    send(7, Event.PORT_READY, 1)
    send(0xFFFF_FFFF, Event.PORT_OPEN, 1)
    a = d.alloc(4)
    c_tx.add([(a, 4, False)])
    d.kick(3)
    assert _control_messages(mem, c_rx, bufs) == []
    assert not dev.status & 0x40
    t.close()
