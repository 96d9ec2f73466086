"""virtio-net (virtio 1.x section 5.1): one receive and one transmit queue over a host back-end.

Offered features: ``MAC`` (the configured or a random locally administered
address), ``STATUS`` (link always up) and, if asked for, ``MRG_RXBUF``.  No
checksum or segmentation offloads, so every frame is a complete Ethernet
frame and the 12-byte ``virtio_net_hdr_v1`` in front of it carries no
offload requests; with a tap back-end (``IFF_VNET_HDR``) the header passes
through unchanged, otherwise the device adds a zero header on receive and
strips it on transmit.

Receive: frames are pulled from the back-end while the guest has receive
buffers.  Without MRG_RXBUF each frame goes into one buffer chain (a frame
that does not fit is dropped and the chain returned empty; Linux's buffers
hold a full 1514-byte frame).  With MRG_RXBUF a frame may span several
chains; ``num_buffers`` says how many.  When the ring runs dry the frame is
kept and read interest is switched off until the guest kicks the receive
queue.

Transmit: each chain is one frame (header + data); chains shorter than the
header or longer than :data:`~pyvmm.net.base.MAX_FRAME` are returned without
being sent.

Threading: both queues and the back-end callback run on the device's loop
with the device lock held.
"""

from __future__ import annotations

import logging
import struct
from enum import IntEnum

from pyvmm.block.iov import iov_from_bytes, iov_to_bytes
from pyvmm.devices.virtio.device import DeviceId, Status, VirtioDevice
from pyvmm.devices.virtio.queue import DescChain, Virtqueue
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.net.base import MAX_FRAME, NetBackend
from pyvmm.net.options import format_mac, random_mac
from pyvmm.qdev import DeviceContext, DeviceProps, Prop, PropType, VirtioType
from pyvmm.vmstate import VmStateError

log = logging.getLogger(__name__)

HDR_LEN = 12
RX, TX = 0, 1
LINK_UP = 1
_NUM_BUFFERS = struct.Struct("<H")
_ZERO_HDR = bytes(HDR_LEN)


class NetFeature(IntEnum):
    CSUM = 0
    GUEST_CSUM = 1
    MTU = 3
    MAC = 5
    MRG_RXBUF = 15
    STATUS = 16


class VirtioNet(VirtioDevice):
    vmstate_migratable = True  # its whole state is in pyvmm.devices.virtio.state
    device_id = DeviceId.NET

    def __init__(self, memory: GuestMemory, backend: NetBackend, *, mac: bytes, name: str = "virtio-net",
                 loop: MainLoop | None = None, queue_size: int = 256, mrg_rxbuf: bool = False) -> None:
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        features = (1 << NetFeature.MAC) | (1 << NetFeature.STATUS)
        if mrg_rxbuf:
            features |= 1 << NetFeature.MRG_RXBUF
        super().__init__(memory, name=name, queue_sizes=[queue_size, queue_size], features=features, loop=loop)
        self.mac = bytes(mac)
        self.backend = backend
        self._rx_pending: bytes | None = None
        self.stats = {"rx_frames": 0, "rx_dropped": 0, "tx_frames": 0, "tx_dropped": 0}
        if loop is not None:
            backend.start(loop, self.backend_readable)

    # -- configuration ---------------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return self.mac + struct.pack("<HH", LINK_UP, 1)  # mac, status, max_virtqueue_pairs

    # VM state: a received frame waiting for a buffer travels with the device; the back-end's
    # own connections (tap, passt) belong to the host and are the destination's
    def save_backend_state(self) -> bytes | None:
        return self._rx_pending

    def load_backend_state(self, state: object) -> None:
        if state is not None and (not isinstance(state, bytes) or len(state) > MAX_FRAME + 64):
            raise VmStateError(f"{self.name}: pending frame in the state is invalid")
        self._rx_pending = state

    def reset_backend(self) -> None:
        self._rx_pending = None
        self.backend.set_read_interest(True)  # drain (and drop) host frames while no driver

    def drains(self, queue: Virtqueue) -> bool:
        return queue.index == TX

    def handle_queue(self, queue: Virtqueue) -> None:
        if queue.index == TX:
            self._transmit(queue)
        else:
            self._receive(queue)

    # -- transmit ---------------------------------------------------------------------------------
    def _transmit(self, queue: Virtqueue) -> None:
        strip = HDR_LEN - self.backend.vnet_hdr_len
        pushed = False
        while (chain := queue.pop()) is not None:
            try:
                ok = HDR_LEN <= chain.read_len <= HDR_LEN + MAX_FRAME
                data = iov_to_bytes(chain.readable) if ok else b""
            finally:
                chain.release()
            if ok and self.backend.send(data[strip:] if strip else data):
                self.stats["tx_frames"] += 1
            else:
                self.stats["tx_dropped"] += 1
            queue.push(chain.head, 0)
            pushed = True
        if pushed:
            self.notify_used(queue)

    # -- receive ------------------------------------------------------------------------------------
    def backend_readable(self) -> None:
        """The back-end has frames (called on the device loop)."""
        with self.lock:
            if not self._live():
                while self.backend.recv() is not None:  # no driver: the frames go nowhere
                    self.stats["rx_dropped"] += 1
                return
            self.process_queue(RX)

    def _live(self) -> bool:
        return bool(self.status & Status.DRIVER_OK) and not self.status & Status.NEEDS_RESET and self.queues[RX].ready

    def _next_frame(self) -> bytes | None:
        frame = self._rx_pending
        self._rx_pending = None
        if frame is None:
            frame = self.backend.recv()
            if frame is None:
                return None
            if self.backend.vnet_hdr_len == 0:
                frame = _ZERO_HDR + frame
            elif len(frame) < HDR_LEN:
                return b""  # malformed from the host side: skip
        return frame

    def _receive(self, queue: Virtqueue) -> None:
        pushed = False
        mergeable = self.has_feature(NetFeature.MRG_RXBUF)
        while True:
            frame = self._next_frame()
            if frame is None:
                self.backend.set_read_interest(True)
                break
            if not frame:
                continue
            if mergeable:
                done = self._receive_mergeable(queue, frame)
                if not done:
                    break
            else:
                # One read of the available index: the guest may rewrite it at any time.
                chain = queue.pop()
                if chain is None:
                    self._rx_pending = frame
                    self.backend.set_read_interest(False)  # until the guest posts buffers
                    break
                try:
                    if chain.write_len >= len(frame):
                        n = iov_from_bytes(chain.writable, frame[:10] + _NUM_BUFFERS.pack(1) + frame[12:])
                        self.stats["rx_frames"] += 1
                    else:
                        n = 0
                        self.stats["rx_dropped"] += 1
                finally:
                    chain.release()
                queue.push(chain.head, n)
            pushed = True
        if pushed:
            self.notify_used(queue)

    def _receive_mergeable(self, queue: Virtqueue, frame: bytes) -> bool:
        """Spread ``frame`` over as many chains as needed; False if the ring ran out (frame kept)."""
        # Count what is available first, so a frame is never half-delivered.  The count is
        # advisory (the guest may rewrite the index): pop() returning None ends the loop too.
        avail = queue.available()
        chains: list[DescChain] = []
        total = 0
        try:
            while total < len(frame) and len(chains) < avail:
                chain = queue.pop()
                if chain is None:
                    break
                chains.append(chain)
                total += chain.write_len
            if total < len(frame):
                # Give the popped chains back untouched: rewind the available index.
                queue.unpop(len(chains))
                if len(chains) >= queue.size:  # the whole ring cannot hold it: never will
                    self.stats["rx_dropped"] += 1
                    return True
                self._rx_pending = frame
                self.backend.set_read_interest(False)
                return False
            data = frame[:10] + _NUM_BUFFERS.pack(len(chains)) + frame[12:]
            off = 0
            used = []
            for chain in chains:
                n = iov_from_bytes(chain.writable, data[off:])
                off += n
                used.append((chain.head, n))
        finally:
            for chain in chains:
                chain.release()
        for head, n in used:
            queue.push(head, n)
        self.stats["rx_frames"] += 1
        return True

    def close(self) -> None:
        self.backend.close()


# -- its registry entry (pyvmm.qdev): virtio-net-pci, virtio-net-device ---------------------------
def _create(ctx: DeviceContext, props: DeviceProps) -> VirtioNet:
    from pyvmm.errors import ConfigError

    netdev = props.get_str("netdev")
    if netdev is None:
        raise ConfigError("netdev= is required (pyvmm has no NIC without a -netdev)")
    mac = props.get("mac") or random_mac()
    if mac[0] & 1:
        raise ConfigError(f"mac={format_mac(mac)}: a multicast address cannot be a NIC address")
    name = props.name("virtio-net")
    backend = ctx.netdev(netdev)
    log.info("%s: mac %s on netdev %s", name, format_mac(mac), netdev)
    try:
        return VirtioNet(ctx.memory, backend, mac=mac, name=name, loop=ctx.iothread,
                         mrg_rxbuf=props.get_bool("mrg_rxbuf"))
    except Exception:
        backend.close()
        raise


DEVICE_TYPES = [VirtioType(
    "virtio-net", _create,
    (Prop("netdev", PropType.STR, None, "ID of a netdev to use as a backend"),
     Prop("mac", PropType.MACADDR, None, "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56"),
     Prop("mrg_rxbuf", PropType.BOOL, False)),
    "a network card")]
