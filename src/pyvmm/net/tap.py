"""The tap back-end: a Linux TAP interface opened through /dev/net/tun.

The interface is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` and a
12-byte vnet header (``TUNSETVNETHDRSZ``), the size of virtio 1.x's
``virtio_net_hdr_v1``, so guest headers go to the kernel unchanged and the
kernel's come back unchanged.  No offloads are enabled (``TUNSETOFFLOAD``
stays 0), so the kernel never hands over GSO or partial-checksum frames,
matching the features virtio-net offers.  The fd is non-blocking and read
on the device's loop; a full tap queue drops frames.

The interface itself (address, up) is configured by whoever owns the host
side, e.g. ``ip tuntap add tap0 mode tap`` beforehand, or after start-up.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Callable

from pyvmm.errors import DeviceError
from pyvmm.loop import MainLoop
from pyvmm.net.base import MAX_FRAME

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
VNET_HDR_LEN = 12


class IfReq(ctypes.Structure):
    """``struct ifreq`` with the flags member of its union (padded to the full 40 bytes)."""

    _fields_ = [("ifr_name", ctypes.c_char * 16), ("ifr_flags", ctypes.c_short), ("_pad", ctypes.c_byte * 22)]


assert ctypes.sizeof(IfReq) == 40


class TapBackend:
    """One tap interface; frames carry a 12-byte virtio-net header."""

    vnet_hdr_len = VNET_HDR_LEN

    def __init__(self, ifname: str = "", *, device: str = TUN_DEVICE) -> None:
        try:
            fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"tap: cannot open {device}: {e.strerror}") from None
        try:
            req = IfReq(ifr_name=ifname.encode(), ifr_flags=IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, req)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, ctypes.c_int(VNET_HDR_LEN))
        except OSError as e:
            os.close(fd)
            raise DeviceError(f"tap: cannot attach to {ifname or 'a new tap interface'}: {e.strerror}") from None
        self.fd = fd
        self.name = req.ifr_name.decode()
        self._loop: MainLoop | None = None
        self._on_readable: Callable[[], None] | None = None
        self._reading = False
        self.dropped_tx = 0
        log.info("tap: attached to %s", self.name)

    @classmethod
    def from_fd(cls, fd: int) -> TapBackend:
        """QEMU's ``-netdev tap,fd=N``: a tap the parent opened (libvirt does).  It must be a tap with
        a vnet header (``IFF_VNET_HDR``), which pyvmm's virtio-net needs; the header size is set here."""
        req = IfReq()
        try:
            fcntl.ioctl(fd, TUNGETIFF, req)
        except OSError as e:
            raise DeviceError(f"tap: fd={fd} is not a tap device: {e.strerror}") from None
        if not req.ifr_flags & IFF_TAP or not req.ifr_flags & IFF_VNET_HDR or not req.ifr_flags & IFF_NO_PI:
            raise DeviceError(f"tap: fd={fd} ({req.ifr_name.decode()}) was opened without IFF_TAP, IFF_NO_PI "
                              "and IFF_VNET_HDR, which pyvmm needs")
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, ctypes.c_int(VNET_HDR_LEN))
        except OSError as e:
            raise DeviceError(f"tap: fd={fd}: cannot set the vnet header size: {e.strerror}") from None
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        self = cls.__new__(cls)
        self.fd = fd
        self.name = req.ifr_name.decode()
        self._loop = None
        self._on_readable = None
        self._reading = False
        self.dropped_tx = 0
        log.info("tap: attached to %s (fd %d)", self.name, fd)
        return self

    def start(self, loop: MainLoop, on_readable: Callable[[], None]) -> None:
        self._loop = loop
        self._on_readable = on_readable
        self.set_read_interest(True)

    def set_read_interest(self, enabled: bool) -> None:
        if self._loop is None or enabled == self._reading or self.fd < 0:
            return
        self._reading = enabled
        if enabled:
            assert self._on_readable is not None
            self._loop.add_reader(self.fd, self._on_readable)
        else:
            self._loop.remove_reader(self.fd)

    def recv(self) -> bytes | None:
        if self.fd < 0:
            return None
        try:
            return os.read(self.fd, VNET_HDR_LEN + MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno == errno.EBADFD:  # interface went down/away; the fd stays readable
                log.warning("tap %s: %s; no more input", self.name, e.strerror)
                self.set_read_interest(False)
                return None
            raise DeviceError(f"tap {self.name}: read failed: {e.strerror}") from None

    def send(self, frame: bytes) -> bool:
        if self.fd < 0:
            return False
        try:
            os.write(self.fd, frame)
            return True
        except (BlockingIOError, InterruptedError):
            self.dropped_tx += 1
            return False
        except OSError as e:  # e.g. EIO while the interface is down
            self.dropped_tx += 1
            log.debug("tap %s: write failed: %s", self.name, e.strerror)
            return False

    def close(self) -> None:
        if self.fd >= 0:
            self.set_read_interest(False)
            os.close(self.fd)
            self.fd = -1
