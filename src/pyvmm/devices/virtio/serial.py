"""virtio-serial: the virtio console with MULTIPORT (virtio 1.x section 5.3.6), named ports.

QEMU's spellings: ``-device virtio-serial-pci`` (``virtio-serial-device`` on virtio-mmio)
makes the bus; ``-device virtserialport,chardev=ID,name=NAME`` and ``-device virtconsole``
put ports on it.  A Linux guest sees ``/dev/vportNpM`` (udev links it as
``/dev/virtio-ports/NAME``) or, for a ``virtconsole``, ``/dev/hvcN``.

Queues: port 0 uses queues 0 (receiveq) and 1 (transmitq); queues 2 and 3 are the control
receiveq (device -> driver) and transmitq (driver -> device); port ``n >= 1`` uses
``2n + 2`` and ``2n + 3``.  Control messages are ``le32 id, le16 event, le16 value``
(a PORT_NAME message is followed by the name).

The handshake, as QEMU's virtio-serial-bus does it: the driver sends DEVICE_READY, the
device answers with one PORT_ADD per port; the driver sends PORT_READY for each, and the
device answers with CONSOLE_PORT (virtconsole), PORT_NAME (a named port) and PORT_OPEN
if the host side is connected.  PORT_OPEN from the driver says a guest program opened or
closed the port; PORT_OPEN from the device follows the host side: a socket chardev's
client connecting or leaving (``host_open_changed``, see :mod:`pyvmm.chardev.base`).

Guest input: host bytes wait in a small bounded buffer per port until the guest has the
port open and posts receive buffers; a full buffer pauses the back-end (back-pressure),
as QEMU's ``virtio_serial_guest_ready`` does.  Input left when the host side disconnects
is dropped: it was meant for a client that is gone.

Guest-supplied ids, events and lengths are checked: messages for ports that do not exist
are ignored with one rate-limited line.  Threading: everything holds the device lock.
"""

from __future__ import annotations

import collections
import logging
import struct
import weakref
from enum import IntEnum

from pyvmm.block.iov import iov_from_bytes, iov_pieces, iov_slice, iov_to_bytes
from pyvmm.chardev import CharBackend
from pyvmm.devices.virtio.device import DeviceId, Status, VirtioDevice
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.errors import ConfigError
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.qdev import BusKind, DeviceContext, DeviceProps, DeviceType, Prop, PropType, VirtioType
from pyvmm.ratelimit import guest_log
from pyvmm.vmstate.protocol import VmStateError

log = logging.getLogger(__name__)

DEFAULT_MAX_PORTS = 31
#: VIRTIO_QUEUE_MAX / 2 - 1, QEMU's limit.
MAX_PORTS_LIMIT = 511
PENDING_MAX = 4096
TX_PIECE = 64 << 10
#: Control messages waiting for the driver's receive buffers (a few per port at most).
CONTROL_PENDING_MAX = 1024
NAME_MAX = 255
EMERG_WR_OFFSET = 8
CTRL_RX, CTRL_TX = 2, 3
BAD_ID = 0xFFFF_FFFF
_CTRL = struct.Struct("<IHH")


class SerialFeature(IntEnum):
    SIZE = 0
    MULTIPORT = 1
    EMERG_WRITE = 2


class Event(IntEnum):
    DEVICE_READY = 0
    PORT_ADD = 1
    PORT_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7


def port_queues(nr: int) -> tuple[int, int]:
    """(receiveq, transmitq) of port ``nr``."""
    rx = 0 if nr == 0 else 2 * nr + 2
    return rx, rx + 1


def queue_port(index: int) -> tuple[int, bool] | None:
    """(port nr, is transmitq) of a data queue; None for the control queues."""
    if index < 2:
        return 0, index == 1
    if index in (CTRL_RX, CTRL_TX):
        return None
    return (index - 2) // 2, index % 2 == 1


class SerialPort:
    """One port: its number, name, back-end and the open state of both ends."""

    def __init__(self, backend: CharBackend | None, *, name: str = "", console: bool = False,
                 label: str = "virtserialport") -> None:
        self.backend = backend
        self.name = name
        self.console = console
        self.label = label
        self.nr = -1
        self.guest_connected = False
        self.host_connected = bool(getattr(backend, "connected", True)) if backend is not None else False
        self.pending = bytearray()
        self.bus: VirtioSerial | None = None

    #: A port's state travels with its bus (VirtioSerial.save_backend_state).
    vmstate_stateless = True

    # -- CharReceiver (loop thread) -------------------------------------------------------------
    def can_receive(self) -> int:
        bus = self.bus
        if bus is None:
            return 0
        with bus.lock:
            return PENDING_MAX - len(self.pending)

    def receive(self, data: bytes) -> None:
        if self.bus is not None:
            self.bus.port_input(self, data)

    def host_open_changed(self, opened: bool) -> None:
        if self.bus is not None:
            self.bus.port_host_open(self, opened)


class VirtioSerial(VirtioDevice):
    device_id = DeviceId.CONSOLE
    vmstate_migratable = True  # ports and control messages in save_backend_state

    def __init__(self, memory: GuestMemory, *, name: str = "virtio-serial", loop: MainLoop | None = None,
                 max_ports: int = DEFAULT_MAX_PORTS, queue_size: int = 128, emergency_write: bool = True) -> None:
        if not 1 <= max_ports <= MAX_PORTS_LIMIT:
            raise ConfigError(f"maximum ports supported: {MAX_PORTS_LIMIT}")
        features = 1 << SerialFeature.MULTIPORT
        if emergency_write:
            features |= 1 << SerialFeature.EMERG_WRITE
        super().__init__(memory, name=name, queue_sizes=[queue_size] * (2 * (max_ports + 1)), features=features,
                         loop=loop)
        self.max_ports = max_ports
        self.ports: dict[int, SerialPort] = {}
        self._control: collections.deque[bytes] = collections.deque()

    # -- ports (machine building) ----------------------------------------------------------------
    def add_port(self, port: SerialPort, nr: int | None = None) -> SerialPort:
        """Place ``port`` at ``nr`` or the first free number (QEMU's rules and wording)."""
        with self.lock:
            if port.name and any(p.name == port.name for p in self.ports.values()):
                raise ConfigError(f"virtio-serial-bus: A port already exists by name {port.name}")
            if nr is None:
                if port.console and 0 not in self.ports:
                    nr = 0
                else:
                    nr = next((i for i in range(1, self.max_ports) if i not in self.ports), None)
                    if nr is None:
                        raise ConfigError("virtio-serial-bus: Out of port numbers")
            elif nr == 0 and not port.console:
                raise ConfigError("virtio-serial-bus: Port number 0 on virtio-serial devices reserved for "
                                  "virtconsole devices for backward compatibility.")
            elif nr in self.ports:
                raise ConfigError(f"virtio-serial-bus: A port already exists at id {nr}")
            elif nr >= self.max_ports:
                raise ConfigError(f"virtio-serial-bus: Out of port numbers (max_ports is {self.max_ports})")
            port.nr = nr
            port.bus = self
            self.ports[nr] = port
        if port.backend is not None:
            port.backend.attach(port)
        return port

    def activate(self) -> None:
        super().activate()
        # Control messages the driver queued before DRIVER_OK were not processed yet.
        for index in (CTRL_TX, CTRL_RX):
            self.process_queue(index)

    # -- config space ------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", 0, 0, self.max_ports, 0)

    def config_write(self, offset: int, data: bytes) -> None:
        port = self.ports.get(0)
        if offset == EMERG_WR_OFFSET and port is not None and port.backend is not None:
            port.backend.write(data[:1])

    # -- queues ------------------------------------------------------------------------------
    def _multiport(self) -> bool:
        return self.has_feature(SerialFeature.MULTIPORT)

    def drains(self, queue: Virtqueue) -> bool:
        where = queue_port(queue.index)
        return queue.index == CTRL_TX if where is None else where[1]

    def handle_queue(self, queue: Virtqueue) -> None:
        index = queue.index
        if index == CTRL_TX:
            self._control_in(queue)
        elif index == CTRL_RX:
            self._flush_control()
        else:
            where = queue_port(index)
            assert where is not None
            nr, tx = where
            port = self.ports.get(nr)
            if tx:
                self._port_output(queue, port)
            elif port is not None:
                self._flush_port(port)

    def _port_output(self, queue: Virtqueue, port: SerialPort | None) -> None:
        pushed = False
        while (chain := queue.pop()) is not None:
            try:
                if port is not None and port.backend is not None:
                    self._send(port, chain.readable)
            finally:
                chain.release()
            queue.push(chain.head, 0)
            pushed = True
        if pushed:
            self.notify_used(queue)

    def _send(self, port: SerialPort, iov: list[memoryview]) -> None:
        assert port.backend is not None
        for piece in iov_pieces(iov, TX_PIECE):
            try:
                port.backend.write(bytes(piece))
            except OSError as e:
                log.debug("%s: port %d output dropped: %s", self.name, port.nr, e)
                return
            finally:
                piece.release()

    def _port_ready(self, port: SerialPort) -> bool:
        return port.guest_connected or not self._multiport()

    def _flush_port(self, port: SerialPort) -> None:
        if not port.pending or not self._port_ready(port):
            return
        q = self.queues[port_queues(port.nr)[0]]
        was_full = len(port.pending) >= PENDING_MAX
        self.deliver_input(q, port.pending)
        if was_full and len(port.pending) < PENDING_MAX and port.backend is not None:
            port.backend.accept_input()

    # -- the control queues ------------------------------------------------------------------
    def _control_in(self, queue: Virtqueue) -> None:
        pushed = False
        while (chain := queue.pop()) is not None:
            try:
                raw = iov_to_bytes(iov_slice(chain.readable, 0, min(chain.read_len, _CTRL.size)))
            finally:
                chain.release()
            queue.push(chain.head, 0)
            pushed = True
            if len(raw) < _CTRL.size:
                guest_log(log, logging.WARNING, "%s: short control message (%d bytes)", self.name, len(raw))
                continue
            self._control_event(*_CTRL.unpack(raw))
        if pushed:
            self.notify_used(queue)

    def _control_event(self, ident: int, event: int, value: int) -> None:
        if event == Event.DEVICE_READY:
            if not value:
                guest_log(log, logging.WARNING, "%s: the guest driver failed to initialise the device", self.name)
                return
            for nr in sorted(self.ports):
                self._queue_control(nr, Event.PORT_ADD, 1)
            return
        port = self.ports.get(ident)
        if port is None:
            guest_log(log, logging.WARNING, "%s: control event %d for port %d, which does not exist",
                      self.name, event, ident)
            return
        if event == Event.PORT_READY:
            if not value:
                guest_log(log, logging.WARNING, "%s: the guest failed to add port %d", self.name, ident)
                return
            if port.console:
                self._queue_control(port.nr, Event.CONSOLE_PORT, 1)
            if port.name:
                self._queue_control(port.nr, Event.PORT_NAME, 1, port.name.encode())
            if port.host_connected:
                self._queue_control(port.nr, Event.PORT_OPEN, 1)
        elif event == Event.PORT_OPEN:
            port.guest_connected = bool(value)
            log.debug("%s: guest %s port %d", self.name, "opened" if value else "closed", ident)
            if port.guest_connected:
                self._flush_port(port)
        # Other events from the driver (RESIZE etc.) carry nothing the device uses.

    def _queue_control(self, nr: int, event: int, value: int, extra: bytes = b"") -> None:
        if len(self._control) >= CONTROL_PENDING_MAX:
            guest_log(log, logging.WARNING, "%s: control queue full; dropping event %d", self.name, event)
            return
        self._control.append(_CTRL.pack(nr, event, value) + extra)
        self._flush_control()

    def _flush_control(self) -> None:
        if not self.status & Status.DRIVER_OK or self.status & Status.NEEDS_RESET:
            return
        q = self.queues[CTRL_RX]
        if not q.ready:
            return
        pushed = False
        while self._control:
            chain = q.pop()
            if chain is None:
                break
            msg = self._control.popleft()
            try:
                n = iov_from_bytes(chain.writable, msg)
            finally:
                chain.release()
            q.push(chain.head, n)
            pushed = True
        if pushed:
            self.notify_used(q)

    # -- host side (loop thread) ---------------------------------------------------------------
    def port_input(self, port: SerialPort, data: bytes) -> None:
        with self.lock:
            room = PENDING_MAX - len(port.pending)
            if len(data) > room:
                log.debug("%s: port %d: dropping %d input bytes", self.name, port.nr, len(data) - room)
            port.pending += data[:room]
            self._kick_rx(port)

    def _kick_rx(self, port: SerialPort) -> None:
        if self.status & Status.DRIVER_OK and not self.status & Status.NEEDS_RESET:
            self.process_queue(port_queues(port.nr)[0])

    def port_host_open(self, port: SerialPort, opened: bool) -> None:
        with self.lock:
            if port.host_connected == opened:
                return
            port.host_connected = opened
            if not opened:
                port.pending.clear()
                if port.backend is not None:
                    port.backend.accept_input()
            if self._multiport() and self.status & Status.DRIVER_OK:
                self._queue_control(port.nr, Event.PORT_OPEN, int(opened))

    # -- VM state (pyvmm.devices.virtio.state): per port, whether the guest has it open and the
    # input it has not read; the control messages not delivered yet ------------------------------
    def save_backend_state(self) -> dict[str, object]:
        return {"ports": {str(nr): {"guest_connected": p.guest_connected, "pending": bytes(p.pending)}
                          for nr, p in self.ports.items()},
                "control": list(self._control)}

    def load_backend_state(self, state: object) -> None:
        ports = state.get("ports") if isinstance(state, dict) else None
        control = state.get("control") if isinstance(state, dict) else None
        if not isinstance(ports, dict) or sorted(ports) != sorted(str(nr) for nr in self.ports):
            raise VmStateError(f"{self.name}: the ports in the state do not match this device's")
        if not isinstance(control, list) or len(control) > CONTROL_PENDING_MAX or \
                not all(isinstance(m, bytes) and _CTRL.size <= len(m) <= _CTRL.size + NAME_MAX for m in control):
            raise VmStateError(f"{self.name}: control messages in the state are invalid")
        for key, st in ports.items():
            port = self.ports[int(key)]
            pending = st.get("pending") if isinstance(st, dict) else None
            if not isinstance(pending, bytes) or len(pending) > PENDING_MAX:
                raise VmStateError(f"{self.name}: port {key} state is invalid")
            port.guest_connected = bool(st.get("guest_connected"))
            port.pending[:] = pending
        self._control = collections.deque(control)
        if self._multiport():
            # The host side here may differ from the source's: tell the driver how it is now.
            for nr, port in sorted(self.ports.items()):
                self._control.append(_CTRL.pack(nr, Event.PORT_OPEN, int(port.host_connected)))

    # -- life cycle --------------------------------------------------------------------------
    def reset_backend(self) -> None:
        # Host input already read stays: it belongs to the host's connection, not to the driver
        # (QEMU leaves it unread in the socket).  A driver reset happens at every boot's probe.
        self._control.clear()
        for port in self.ports.values():
            port.guest_connected = False

    def close(self) -> None:
        for port in self.ports.values():
            if port.backend is not None:
                port.backend.close()


# -- registry entries ---------------------------------------------------------------------------
#: The virtio-serial buses of each machine, in creation order (ports find theirs here).
_BUSES: weakref.WeakKeyDictionary[object, list[tuple[str | None, VirtioSerial]]] = weakref.WeakKeyDictionary()


def _create_bus(ctx: DeviceContext, props: DeviceProps) -> VirtioSerial:
    dev = VirtioSerial(ctx.memory, name=props.name("virtio-serial"), loop=ctx.iothread,
                       max_ports=props.get_int("max_ports"), emergency_write=props.get_bool("emergency-write"))
    _BUSES.setdefault(ctx, []).append((props.id, dev))
    return dev


def _find_bus(ctx: DeviceContext, driver: str, bus: str | None) -> VirtioSerial:
    buses = _BUSES.get(ctx, [])
    if bus is None:
        if not buses:
            raise ConfigError(f"No 'virtio-serial-bus' bus found for device '{driver}'")
        return buses[-1][1]
    ident, _, number = bus.rpartition(".")
    for bid, dev in buses:
        if bid is not None and bid == ident and number == "0":
            return dev
    raise ConfigError(f"Bus '{bus}' not found")


def _make_port_factory(driver: str, console: bool):  # noqa: ANN202 - a DeviceType factory
    def create(ctx: DeviceContext, props: DeviceProps) -> SerialPort:
        bus = _find_bus(ctx, driver, props.get_str("bus"))
        name = props.get_str("name") or ""
        if len(name.encode()) > NAME_MAX:
            raise ConfigError(f"Property '{driver}.name' is longer than {NAME_MAX} bytes")
        chardev = props.get_str("chardev")
        backend = ctx.chardev(chardev) if chardev else None
        port = SerialPort(backend, name=name, console=console, label=props.name(driver))
        nr = props.get("nr")
        try:
            return bus.add_port(port, None if nr is None else int(nr))
        except ConfigError:
            if backend is not None:
                backend.close()
            raise
    return create


_PORT_PROPS = (
    Prop("chardev", PropType.STR, None, "ID of a chardev to use as a backend"),
    Prop("name", PropType.STR, None, "the port's name, as the guest sees it (/dev/virtio-ports/NAME)"),
    Prop("nr", PropType.UINT32, None, "port number on the bus"),
    Prop("bus", PropType.STR, None, "the virtio-serial bus, ID.0"),
)

DEVICE_TYPES: list[VirtioType | DeviceType] = [
    VirtioType("virtio-serial", _create_bus,
               (Prop("max_ports", PropType.UINT32, DEFAULT_MAX_PORTS, "most ports on this bus"),
                Prop("emergency-write", PropType.BOOL, True, "offer VIRTIO_CONSOLE_F_EMERG_WRITE")),
               "virtio console with named ports (multiport)", aliases={"virtio-serial": "pci"}),
    DeviceType("virtserialport", BusKind.VIRTIO_SERIAL, _make_port_factory("virtserialport", False), _PORT_PROPS,
               "a named port on a virtio-serial bus"),
    DeviceType("virtconsole", BusKind.VIRTIO_SERIAL, _make_port_factory("virtconsole", True), _PORT_PROPS,
               "a console port (hvc) on a virtio-serial bus"),
]
