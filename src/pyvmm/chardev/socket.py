"""The ``unix:PATH`` back-end: the guest console on a Unix-domain socket.

Server mode (``server=on``) listens on PATH and serves one client at a time:
while a client is connected the listening socket is not watched, so further
clients wait in the backlog until the current one leaves.  With no client,
output is dropped; output a slow client has not read yet is queued (up to
1 MiB) and flushed by the loop (:class:`OutputBuffer`).  ``wait=on`` (QEMU's default for servers) blocks the
constructor until the first client connects; ``wait=off`` starts at once.

Client mode (no ``server``) connects to an existing socket at start-up; when
the peer goes away, output is dropped from then on.

Locking: ``_lock`` guards the current client socket; the output queue has
its own lock.  ``write`` runs on vCPU threads; reads, accepts and
disconnects run on the loop thread.  Receivers are never called with the
lock held (a receiver takes its device's lock, which a vCPU may hold while
writing here).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading

from pyvmm.chardev.base import CharBackendBase, OutputBuffer, notify_host_open
from pyvmm.errors import DeviceError
from pyvmm.loop import MainLoop

log = logging.getLogger(__name__)


class UnixSocketBackend(CharBackendBase):
    def __init__(self, loop: MainLoop, path: str, label: str = "serial0", *,
                 server: bool = True, wait: bool = True) -> None:
        super().__init__(label, loop)
        self.path = path
        self.server = server
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._out = OutputBuffer(loop, label)
        if server:
            self._listen(watch=not wait)
            if wait:
                assert self._listener is not None   # set by _listen
                log.info("%s: waiting for connection on unix:%s,server=on", label, path)
                self._listener.setblocking(True)
                try:
                    conn, _ = self._listener.accept()
                finally:
                    self._listener.setblocking(False)
                self._set_client(conn)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
            except OSError as e:
                s.close()
                raise DeviceError(f"chardev {label}: cannot connect to unix:{path}: {e.strerror}") from None
            self._set_client(s)

    @property
    def connected(self) -> bool:
        return self._client is not None

    # -- setup -------------------------------------------------------------------------------
    def _listen(self, watch: bool) -> None:
        try:
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                os.unlink(self.path)  # a stale socket from an earlier run, as QEMU does
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DeviceError(f"chardev {self.label}: {self.path}: {e.strerror}") from None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(self.path)
            s.listen(1)
        except OSError as e:
            s.close()
            raise DeviceError(f"chardev {self.label}: cannot listen on unix:{self.path}: {e.strerror}") from None
        s.setblocking(False)
        self._listener = s
        if watch:  # with wait=on the constructor accepts the first client itself
            assert self._loop is not None
            self._loop.add_reader(s.fileno(), self._on_accept)

    def _set_client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        with self._lock:
            self._client = conn
        self._out.set_target(conn.fileno(), conn.send, lambda err: self._on_send_error(conn, err))
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
        log.info("%s: client connected on unix:%s", self.label, self.path)
        if self._receiver is not None:
            self._start_input(conn.fileno())
            notify_host_open(self._receiver, True)

    def _on_accept(self) -> None:
        if self._listener is None or self._closed:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("%s: accept failed: %s", self.label, e)
            return
        if self._client is not None:
            conn.close()  # one client at a time
            return
        self._set_client(conn)

    def _disconnect(self, conn: socket.socket) -> None:
        """Drop ``conn`` if it is still the client (loop thread)."""
        with self._lock:
            if self._client is not conn:
                return
            self._client = None
        self._out.clear_target()
        if self._in_fd == conn.fileno():
            self._stop_input()
        conn.close()
        log.info("%s: client disconnected from unix:%s", self.label, self.path)
        if self._receiver is not None:
            notify_host_open(self._receiver, False)
        if self._listener is not None and not self._closed and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._on_accept)

    # -- protocol ----------------------------------------------------------------------------
    def write(self, data: bytes) -> int:
        if self._closed:
            return 0
        return self._out.write(data)  # no client: dropped; slow client: queued for the loop

    def _on_send_error(self, conn: socket.socket, err: OSError) -> None:
        log.debug("%s: send failed: %s", self.label, err)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._disconnect(conn))

    def _on_attach(self) -> None:
        conn = self._client
        if conn is not None:
            self._start_input(conn.fileno())

    def _read(self, fd: int, size: int) -> bytes:
        conn = self._client
        if conn is None or conn.fileno() != fd:
            return b""
        return conn.recv(size)

    def _on_eof(self) -> None:
        conn = self._client
        if conn is not None:
            self._disconnect(conn)
        else:
            self._stop_input()

    def _on_read_error(self, err: OSError) -> None:
        self._on_eof()

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._out.clear_target()
        with self._lock:
            conn, self._client = self._client, None
        if conn is not None:
            conn.close()
        if self._listener is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
