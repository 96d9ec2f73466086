"""The user-mode back-end: a ``passt`` helper process, no root or tap needed.

passt is spawned with one end of a ``socketpair`` (``passt -f -q --fd N``)
and speaks QEMU's stream protocol on it (as ``-netdev stream``): each frame
is preceded by its length as a 4-byte big-endian integer.  passt answers
DHCP/ARP/NDP itself and turns the guest's TCP/UDP/ICMP into host sockets;
connections to the gateway address reach the host's loopback (passt's
default gateway mapping).  It runs with the privileges and in the network
namespace of this process, so its reach is exactly the host's.

The socket is non-blocking and read on the device's loop.  Sends that do not
fit the socket buffer are queued (up to :data:`MAX_BACKLOG` bytes, after
which frames are dropped) and flushed when the socket is writable, so a
frame is never cut in half.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable

from pyvmm.errors import DeviceError
from pyvmm.loop import MainLoop
from pyvmm.net.base import MAX_FRAME

log = logging.getLogger(__name__)

MAX_BACKLOG = 1 << 20
_LEN = struct.Struct(">I")


class StreamBackend:
    """Length-prefixed Ethernet frames over a stream socket (QEMU's ``-netdev stream`` framing)."""

    vnet_hdr_len = 0

    def __init__(self, sock: socket.socket, name: str = "stream") -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._loop: MainLoop | None = None
        self._on_readable: Callable[[], None] | None = None
        self._reading = False
        self._writing = False
        self._eof = False
        self.dropped_tx = 0
        self.dropped_rx = 0

    def start(self, loop: MainLoop, on_readable: Callable[[], None]) -> None:
        self._loop = loop
        self._on_readable = on_readable
        self.set_read_interest(True)

    def set_read_interest(self, enabled: bool) -> None:
        enabled = enabled and not self._eof
        if self._loop is None or enabled == self._reading:
            return
        self._reading = enabled
        if enabled:
            assert self._on_readable is not None
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
        else:
            self._loop.remove_reader(self.sock.fileno())

    def _frame_from_buffer(self) -> bytes | None:
        while len(self._inbuf) >= 4:
            (length,) = _LEN.unpack_from(self._inbuf)
            if length > MAX_FRAME:
                # Out of sync or hostile peer: nothing after this can be trusted.
                log.error("%s: frame length %d from the helper is too large; closing", self.name, length)
                self._inbuf.clear()
                self._eof = True
                self.set_read_interest(False)
                return None
            if len(self._inbuf) < 4 + length:
                return None
            frame = bytes(self._inbuf[4:4 + length])
            del self._inbuf[:4 + length]
            if length:
                return frame
        return None

    def recv(self) -> bytes | None:
        frame = self._frame_from_buffer()
        if frame is not None or self._eof:
            return frame
        try:
            data = self.sock.recv(256 << 10)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            data = b""
            log.warning("%s: receive failed: %s", self.name, e)
        if not data:
            log.warning("%s: the network helper closed the connection", self.name)
            self._eof = True
            self.set_read_interest(False)
            return None
        self._inbuf += data
        return self._frame_from_buffer()

    def send(self, frame: bytes) -> bool:
        if self._eof or len(frame) > MAX_FRAME:
            self.dropped_tx += 1
            return False
        msg = _LEN.pack(len(frame)) + frame
        if self._outbuf:
            if len(self._outbuf) + len(msg) > MAX_BACKLOG:
                self.dropped_tx += 1
                return False
            self._outbuf += msg
            return True
        try:
            sent = self.sock.send(msg)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            log.warning("%s: send failed: %s", self.name, e)
            self.dropped_tx += 1
            return False
        if sent < len(msg):
            self._outbuf += msg[sent:]
            self._want_write(True)
        return True

    def _want_write(self, on: bool) -> None:
        if self._loop is None or on == self._writing:
            return
        self._writing = on
        if on:
            self._loop.add_writer(self.sock.fileno(), self._flush)
        else:
            self._loop.remove_writer(self.sock.fileno())

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("%s: send failed: %s", self.name, e)
            self._outbuf.clear()
            sent = 0
        del self._outbuf[:sent]
        if not self._outbuf:
            self._want_write(False)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.set_read_interest(False)
            self._want_write(False)
            self.sock.close()


class PasstBackend(StreamBackend):
    """A passt child process connected by a socketpair."""

    def __init__(self, passt: str = "", extra_args: tuple[str, ...] = ()) -> None:
        exe = passt or shutil.which("passt") or ""
        if not exe or not os.access(exe, os.X_OK):
            raise DeviceError("--netdev user needs the passt program (Debian package 'passt'); not found"
                              + (f" at {passt}" if passt else " in PATH"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [exe, "--foreground", "--quiet", "--fd", str(theirs.fileno()), *extra_args]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError as e:
            ours.close()
            raise DeviceError(f"cannot start {exe}: {e.strerror}") from None
        finally:
            theirs.close()
        super().__init__(ours, name=f"passt[{self.proc.pid}]")
        log.info("user network: %s (pid %d)", exe, self.proc.pid)

    def close(self) -> None:
        super().close()  # passt exits when its socket closes (--fd implies --one-off)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
