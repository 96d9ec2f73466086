"""The network back-end protocol between virtio-net and the host side (tap, passt).

A back-end moves whole Ethernet frames.  If ``vnet_hdr_len`` is 12, every
frame in both directions starts with a ``virtio_net_hdr_v1`` (tap with
IFF_VNET_HDR), so the guest's header passes through unchanged; if 0, frames
are bare and the device adds/strips the header itself.

Flow control: the back-end calls ``on_readable()`` on the device's loop when
frames may be waiting; the device pulls them with :meth:`NetBackend.recv`
while it has receive buffers and switches read interest off when the guest
has none (so a level-triggered fd does not spin), back on when the guest
posts more.  Sends never block: a back-end that cannot take a frame now
drops it, as a full NIC queue would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pyvmm.loop import MainLoop

#: Largest frame accepted from either side (64 KiB of payload plus Ethernet/VLAN headers).
MAX_FRAME = 65536 + 18


class NetBackend(Protocol):
    vnet_hdr_len: int
    name: str

    def start(self, loop: MainLoop, on_readable: Callable[[], None]) -> None:
        """Begin watching the host side on ``loop``."""
        ...

    def set_read_interest(self, enabled: bool) -> None:
        ...

    def recv(self) -> bytes | None:
        """One frame if one is ready, else None.  Never blocks."""
        ...

    def send(self, frame: bytes) -> bool:
        """Queue one frame for the host; False if it was dropped."""
        ...

    def close(self) -> None:
        ...
