"""virtio-console (virtio 1.x section 5.3), one port, no multiport: the guest's hvc0.

Queue 0 (receiveq) holds device-writable buffers for input to the guest;
queue 1 (transmitq) carries guest output.  Output chains are sent to the
:class:`~pyvmm.chardev.CharBackend` as they arrive, in pieces of
:data:`TX_PIECE` bytes (never one host copy of a whole chain).  Input arrives from the
back-end on the main-loop thread through :meth:`receive`; bytes that find no
receive buffer wait in a small bounded buffer, and ``can_receive`` reports
the room left there so the back-end pauses reading (back-pressure) instead
of the device dropping input.  When the guest posts new receive buffers the
pending bytes go out and the back-end is told to resume.

``VIRTIO_CONSOLE_F_EMERG_WRITE`` is offered: a write to config offset 8 emits
one character, usable before the queues are up.

Threading: everything touching queues or the pending buffer holds the
device lock (queue handlers on the device loop, :meth:`receive` on the main
loop).
"""

from __future__ import annotations

import logging
import struct
from enum import IntEnum

from pyvmm.block.iov import iov_pieces
from pyvmm.chardev import CharBackend
from pyvmm.devices.virtio.device import DeviceId, Status, VirtioDevice
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.qdev import DeviceContext, DeviceProps, Prop, PropType, VirtioType
from pyvmm.vmstate import VmStateError

log = logging.getLogger(__name__)

RX_QUEUE, TX_QUEUE = 0, 1
PENDING_MAX = 4096
#: Guest output goes to the back-end in copies of at most this many bytes.
TX_PIECE = 64 << 10
EMERG_WR_OFFSET = 8


class ConsoleFeature(IntEnum):
    SIZE = 0
    MULTIPORT = 1
    EMERG_WRITE = 2


class VirtioConsole(VirtioDevice):
    vmstate_migratable = True  # its whole state is in pyvmm.devices.virtio.state
    device_id = DeviceId.CONSOLE

    def __init__(self, memory: GuestMemory, backend: CharBackend | None, *, name: str = "virtio-console",
                 loop: MainLoop | None = None, queue_size: int = 128) -> None:
        super().__init__(memory, name=name, queue_sizes=[queue_size, queue_size],
                         features=1 << ConsoleFeature.EMERG_WRITE, loop=loop)
        self.backend = backend
        self._pending = bytearray()
        if backend is not None:
            backend.attach(self)

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", 80, 25, 1, 0)

    def config_write(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR_OFFSET and self.backend is not None:
            self.backend.write(data[:1])

    # -- guest -> host ------------------------------------------------------------------------
    def drains(self, queue: Virtqueue) -> bool:
        return queue.index != RX_QUEUE  # receive buffers wait for input

    def handle_queue(self, queue: Virtqueue) -> None:
        if queue.index == RX_QUEUE:
            self._flush_rx()
            return
        pushed = False
        while (chain := queue.pop()) is not None:
            try:
                self._send(chain.readable)
            finally:
                chain.release()
            queue.push(chain.head, 0)
            pushed = True
        if pushed:
            self.notify_used(queue)

    def _send(self, iov: list[memoryview]) -> None:
        """Guest output to the back-end in pieces of :data:`TX_PIECE` bytes.

        A chain may describe up to 256 MiB; copying it whole would cost the host that much
        memory (twice, for a join).  Pieces keep the copy small and the back-end bounds
        what it queues for a slow peer.
        """
        if self.backend is None:
            return
        for piece in iov_pieces(iov, TX_PIECE):
            try:
                self.backend.write(bytes(piece))
            except OSError as e:  # a dead peer drops output; it must not break the device
                log.debug("%s: output dropped: %s", self.name, e)
                return
            finally:
                piece.release()

    # -- host -> guest (CharReceiver, main-loop thread) --------------------------------------------
    def can_receive(self) -> int:
        with self.lock:
            return PENDING_MAX - len(self._pending)

    def receive(self, data: bytes) -> None:
        with self.lock:
            room = PENDING_MAX - len(self._pending)
            if len(data) > room:
                log.debug("%s: dropping %d input bytes", self.name, len(data) - room)
            self._pending += data[:room]
            self.process_queue_rx()

    def process_queue_rx(self) -> None:
        with self.lock:
            if self.status & Status.DRIVER_OK and not self.status & Status.NEEDS_RESET:
                self.process_queue(RX_QUEUE)

    def _flush_rx(self) -> None:
        q = self.queues[RX_QUEUE]
        was_full = len(self._pending) >= PENDING_MAX
        self.deliver_input(q, self._pending)
        if was_full and len(self._pending) < PENDING_MAX and self.backend is not None:
            self.backend.accept_input()

    # VM state: input the guest has not read yet travels with the device (pyvmm.devices.virtio.state)
    def save_backend_state(self) -> bytes:
        return bytes(self._pending)

    def load_backend_state(self, state: object) -> None:
        if not isinstance(state, bytes) or len(state) > PENDING_MAX:
            raise VmStateError(f"{self.name}: pending input in the state is invalid")
        self._pending[:] = state

    def reset_backend(self) -> None:
        self._pending.clear()
        if self.backend is not None:
            self.backend.accept_input()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


# -- its registry entry (pyvmm.qdev): virtio-console-pci, virtio-console-device -------------------
def _create(ctx: DeviceContext, props: DeviceProps) -> VirtioConsole:
    backend = ctx.chardev(props.get_str("chardev") or "null")
    return VirtioConsole(ctx.memory, backend, name=props.name("virtio-console"), loop=ctx.iothread)


DEVICE_TYPES = [VirtioType(
    "virtio-console", _create, (Prop("chardev", PropType.STR, None, "ID of a chardev to use as a backend"),),
    "one console port (hvc0), without multiport", aliases={"virtio-console": "device"})]
# QEMU's virtconsole is a port on a virtio-serial bus: see serial.py.
