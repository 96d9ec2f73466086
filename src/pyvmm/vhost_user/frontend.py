"""A vhost-user front end: the VMM's half of the protocol, over a unix socket.

The back end (virtiofsd, a vhost-user-blk daemon...) runs the virtqueues itself: it maps
guest RAM from the file descriptors SET_MEM_TABLE passes, reads the rings at the addresses
SET_VRING_ADDR gives, is woken by the kick eventfd of each queue and signals the call
eventfd when it has used buffers.  The VMM keeps only the device's configuration and the
transport.

Requests are synchronous: one at a time under :attr:`VhostUserFrontend.lock`, each reply
waited for at most ``timeout`` seconds, so a hung back end cannot hang the VMM.  With
REPLY_ACK negotiated every request without a reply of its own asks for an ack, so a request
the back end refuses fails here, with its name.

A back end that goes away is noticed twice over: a request fails (EPIPE, EOF, timeout), or the
socket becomes readable with nothing in it while idle (:meth:`watch` on a loop).  Either way
the front end is marked dead and ``on_gone`` runs once, on the loop thread.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence

from pyvmm.loop import MainLoop
from pyvmm.vhost_user import protocol as p
from pyvmm.vhost_user.protocol import ProtocolError, ProtocolFeature, Request

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


class VhostUserFrontend:
    """One connection to a vhost-user back end."""

    def __init__(self, path: str, *, name: str = "vhost-user", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self.lock = threading.Lock()
        self.features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.dead_reason = ""
        self._on_gone: Callable[[str], None] | None = None
        self._loop: MainLoop | None = None
        self._gone_reported = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise ProtocolError(f"Failed to connect to '{path}': {e.strerror or e}") from None
        self.sock: socket.socket | None = sock

    # -- life --------------------------------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return bool(self.dead_reason)

    @property
    def has_protocol_features(self) -> bool:
        return bool(self.features >> p.F_PROTOCOL_FEATURES & 1)

    def has_protocol_feature(self, bit: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def watch(self, loop: MainLoop, on_gone: Callable[[str], None]) -> None:
        """Notice, on ``loop``, a back end that closes the connection; then call ``on_gone(reason)`` once."""
        self._loop = loop
        self._on_gone = on_gone
        if self.sock is not None:
            loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        if not self.lock.acquire(blocking=False):
            return  # a request is in flight: its own receive sees the end, if it is one
        try:
            sock = self.sock
            if sock is None:
                return
            # Readiness may be stale (a request's reply, consumed since): look without waiting.
            sock.setblocking(False)
            try:
                data = sock.recv(p.HEADER.size, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError as e:
                self._mark_dead(f"connection error: {e.strerror or e}")
                return
            finally:
                if self.sock is not None:
                    self.sock.settimeout(self.timeout)
            if not data:
                self._mark_dead("it closed the connection")
            else:  # the back end never speaks first on this channel
                self._mark_dead("it sent a message nobody asked for")
        finally:
            self.lock.release()

    def _mark_dead(self, reason: str) -> None:
        """Called with :attr:`lock` held (or from the constructor's thread)."""
        if not self.dead_reason:
            self.dead_reason = reason
        sock, self.sock = self.sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        if self._on_gone is not None and not self._gone_reported:
            self._gone_reported = True
            cb, why = self._on_gone, self.dead_reason
            if self._loop is not None:
                self._loop.call_soon_threadsafe(lambda: cb(why))
            else:
                cb(why)

    def close(self) -> None:
        with self.lock:
            self._on_gone = None
            sock, self.sock = self.sock, None
            if sock is not None:
                if self._loop is not None:
                    self._loop.remove_reader(sock.fileno())
                sock.close()
            if not self.dead_reason:
                self.dead_reason = "closed"

    # -- one request -------------------------------------------------------------------------------
    def request(self, req: Request, payload: bytes = b"", fds: Sequence[int] = (), *, reply: bool = False) -> bytes:
        """Send one message; return the reply's payload (``reply``), or wait for the ack (REPLY_ACK)."""
        with self.lock:
            sock = self.sock
            if sock is None:
                raise ProtocolError(f"{req.name}: the back end is gone ({self.dead_reason})")
            ack = not reply and self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
            msg = p.header(req, len(payload), need_reply=ack) + payload
            try:
                if fds:
                    sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
                else:
                    sock.sendall(msg)
                if not reply and not ack:
                    return b""
                body = self._receive(sock, req)
            except ProtocolError as e:
                self._mark_dead(str(e))
                raise ProtocolError(f"{req.name}: {e}") from None
            except TimeoutError:
                self._mark_dead(f"no reply to {req.name} within {self.timeout:g} s")
                raise ProtocolError(f"{req.name}: no reply within {self.timeout:g} s") from None
            except OSError as e:
                self._mark_dead(f"{req.name} failed: {e.strerror or e}")
                raise ProtocolError(f"{req.name}: {e.strerror or e}") from None
        if ack:
            if len(body) != 8:
                raise ProtocolError(f"{req.name}: reply-ack of {len(body)} bytes")
            status = p.U64.unpack(body)[0]
            if status:
                raise ProtocolError(f"{req.name}: the back end refused it (status {status})")
        return body

    def _receive(self, sock: socket.socket, req: Request) -> bytes:
        head = self._read_exact(sock, p.HEADER.size)
        size = p.check_reply(req, head)
        return self._read_exact(sock, size) if size else b""

    @staticmethod
    def _read_exact(sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ProtocolError("the back end closed the connection")
            buf += chunk
        return bytes(buf)

    def _get_u64(self, req: Request) -> int:
        body = self.request(req, reply=True)
        if len(body) != 8:
            raise ProtocolError(f"{req.name}: reply of {len(body)} bytes, expected 8")
        return int(p.U64.unpack(body)[0])

    # -- the requests ------------------------------------------------------------------------------
    def handshake(self) -> None:
        """What QEMU does at connection: features, protocol features, queue count, SET_OWNER."""
        self.features = self._get_u64(Request.GET_FEATURES)
        if self.has_protocol_features:
            offered = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            wanted = offered & p.FRONTEND_PROTOCOL_FEATURES
            self.request(Request.SET_PROTOCOL_FEATURES, p.U64.pack(wanted))
            self.protocol_features = wanted  # reply-acks from here on
            if self.has_protocol_feature(ProtocolFeature.MQ):
                self.queue_num = self._get_u64(Request.GET_QUEUE_NUM)
        self.request(Request.SET_OWNER)
        log.debug("%s: back-end features %#x, protocol features %#x, queues %s", self.name, self.features,
                  self.protocol_features, self.queue_num)

    def set_features(self, features: int) -> None:
        if self.has_protocol_features:
            features |= 1 << p.F_PROTOCOL_FEATURES
        self.request(Request.SET_FEATURES, p.U64.pack(features))

    def set_mem_table(self, regions: list[p.MemRegion]) -> None:
        self.request(Request.SET_MEM_TABLE, p.mem_table(regions), [r.fd for r in regions])

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(Request.SET_VRING_NUM, p.VRING_STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(Request.SET_VRING_BASE, p.VRING_STATE.pack(index, base))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        self.request(Request.SET_VRING_ADDR, p.VRING_ADDR.pack(index, 0, desc, used, avail, 0))

    def _set_vring_fd(self, req: Request, index: int, fd: int | None) -> None:
        self.request(req, p.vring_fd_payload(index, fd is not None), [fd] if fd is not None else [])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, p.VRING_STATE.pack(index, int(enable)))

    def get_vring_base(self, index: int) -> int:
        """Stop the ring; the back end answers with the next available index it would have read."""
        body = self.request(Request.GET_VRING_BASE, p.VRING_STATE.pack(index, 0), reply=True)
        if len(body) != p.VRING_STATE.size:
            raise ProtocolError(f"GET_VRING_BASE: reply of {len(body)} bytes")
        got, num = p.VRING_STATE.unpack(body)
        if got != index:
            raise ProtocolError(f"GET_VRING_BASE: reply for ring {got}, asked for {index}")
        return int(num) & 0xFFFF


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


__all__ = ["DEFAULT_TIMEOUT", "VhostUserFrontend", "new_eventfd"]
