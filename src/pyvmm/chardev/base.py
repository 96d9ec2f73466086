"""Character back-ends: the protocol and the shared input/output plumbing.

A *front-end* (a UART, a virtio console) talks to a :class:`CharBackend`:

* output: ``backend.write(data)`` from a vCPU thread.  It must not block the
  vCPU, so back-ends whose peer can stall (socket, pty) queue what the peer
  cannot take yet (bounded, see :class:`OutputBuffer`) and let the loop
  thread flush it; with no peer at all, output is dropped.
* input: the back-end reads its fd on the main loop thread and calls the
  attached receiver's ``receive(data)`` with at most ``can_receive()`` bytes.
  When ``can_receive()`` is 0 the back-end stops watching its fd (so a full
  UART FIFO stops the loop from spinning) and resumes when the front-end calls
  ``backend.accept_input()`` after the guest has drained some bytes.

Threading: ``write``/``accept_input``/``close`` may be called from any thread;
reading and ``receive`` callbacks happen only on the loop thread.  The pause
flag is written only on the loop thread; ``accept_input`` reads it without a
lock and hands the actual resume to the loop thread, so a vCPU never touches
epoll state of a back-end that is mid-read.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Protocol

from pyvmm.loop import MainLoop

log = logging.getLogger(__name__)

#: Largest single read from an input fd.
READ_CHUNK = 4096
#: Output a socket/pty back-end queues for a slow peer before dropping.
OUTPUT_LIMIT = 1 << 20
#: Largest single flush of queued output.
WRITE_CHUNK = 64 * 1024


class CharReceiver(Protocol):
    """A front-end that accepts input bytes (called on the loop thread)."""

    def can_receive(self) -> int:
        """How many bytes the front-end can take now (0 = stop reading)."""
        ...

    def receive(self, data: bytes) -> None: ...


def notify_host_open(receiver: object, opened: bool) -> None:
    """Tell a front-end that cares (a virtio-serial port) that the host side connected or left.

    Front-ends opt in with a ``host_open_changed(opened)`` method; others are not asked.
    Called on the loop thread, never with a back-end lock held.
    """
    hook = getattr(receiver, "host_open_changed", None)
    if hook is not None:
        hook(opened)


class CharBackend(Protocol):
    """What a front-end device needs from a character back-end."""

    label: str

    def write(self, data: bytes) -> int:
        """Send guest output; returns how many bytes were accepted (the rest was dropped)."""
        ...

    def attach(self, receiver: CharReceiver) -> None:
        """Start delivering input to ``receiver``."""
        ...

    def accept_input(self) -> None:
        """The front-end has room again: resume reading if input was paused.  Any thread."""
        ...

    def close(self) -> None: ...


class OutputBuffer:
    """Non-blocking output to a socket or pty, with a bounded queue the loop drains.

    ``write`` (vCPU threads) sends directly while nothing is queued; whatever the peer
    cannot take now is queued (up to ``limit`` bytes; beyond that output is dropped and
    counted) and the loop thread is asked to flush it when the fd becomes writable.  The
    vCPU never waits for the peer, and a briefly slow reader loses nothing.  This matters
    for Unix sockets in particular: the kernel charges each one-byte send a whole buffer's
    overhead, so a few hundred unread UART bytes already fill the socket.

    ``_lock`` guards the queue and the target; it is never held while calling a device.
    """

    def __init__(self, loop: MainLoop, label: str, limit: int = OUTPUT_LIMIT) -> None:
        self._loop = loop
        self._label = label
        self._limit = limit
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._fd: int | None = None
        self._send: Callable[[bytes | bytearray | memoryview], int] | None = None
        self._on_error: Callable[[OSError], None] | None = None
        self._armed = False
        self.dropped = 0

    def set_target(self, fd: int, send: Callable[[bytes | bytearray | memoryview], int],
                   on_error: Callable[[OSError], None]) -> None:
        """Send to ``fd`` with ``send`` (which must not block); ``on_error`` for hard errors."""
        with self._lock:
            old_fd, armed = self._fd, self._armed
            self._fd, self._send, self._on_error = fd, send, on_error
            self._buf.clear()
            self._armed = False
        if armed and old_fd is not None:
            self._loop.remove_writer(old_fd)

    def clear_target(self) -> None:
        """Forget the peer and any queued output (loop thread or any thread)."""
        with self._lock:
            fd = self._fd
            self._fd = self._send = self._on_error = None
            self._buf.clear()
            armed, self._armed = self._armed, False
        if armed and fd is not None:
            self._loop.remove_writer(fd)

    @property
    def queued(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> int:
        err: OSError | None = None
        on_error: Callable[[OSError], None] | None = None
        with self._lock:
            send = self._send
            if send is None:
                return 0
            sent = 0
            if not self._buf:
                try:
                    sent = send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as e:
                    err, on_error = e, self._on_error
                if err is None and sent == len(data):
                    return sent
            if err is None:
                rest = memoryview(data)[sent:]
                room = max(0, self._limit - len(self._buf))
                self._buf += rest[:room]
                if len(rest) > room:
                    if not self.dropped:
                        log.warning("%s: peer is not reading; output is being dropped", self._label)
                    self.dropped += len(rest) - room
                if self._buf and not self._armed:
                    self._armed = True
                    self._loop.call_soon_threadsafe(self._arm)
                return sent + min(len(rest), room)
        if err is not None and on_error is not None:
            on_error(err)
        return 0

    def _arm(self) -> None:
        with self._lock:
            if self._buf and self._fd is not None and self._armed:
                self._loop.add_writer(self._fd, self._on_writable)
            else:
                self._armed = False

    def _on_writable(self) -> None:
        err: OSError | None = None
        on_error: Callable[[OSError], None] | None = None
        with self._lock:
            fd, send = self._fd, self._send
            if send is None or fd is None:
                return
            try:
                # Release the views before resizing the bytearray (exports block resizing).
                with memoryview(self._buf) as view, view[:WRITE_CHUNK] as chunk:
                    n = send(chunk)
                del self._buf[:n]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                err, on_error = e, self._on_error
                self._buf.clear()
            if not self._buf:
                self._armed = False
                self._loop.remove_writer(fd)
        if err is not None and on_error is not None:
            on_error(err)


def write_blocking(fd: int, data: bytes) -> int:
    """Write all of ``data`` to a blocking fd (stdout, a file), retrying short writes."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            n = os.write(fd, view[done:])
        except InterruptedError:
            continue
        if n <= 0:
            break
        done += n
    return done


class CharBackendBase:
    """Common input pump with back-pressure; subclasses supply the fds and the output."""

    def __init__(self, label: str, loop: MainLoop | None) -> None:
        self.label = label
        self._loop = loop
        self._receiver: CharReceiver | None = None
        self._in_fd: int | None = None
        self._watching = False
        self._paused = False
        self._pollless = False
        self._closed = False

    # -- protocol ----------------------------------------------------------------------------
    def write(self, data: bytes) -> int:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def attach(self, receiver: CharReceiver) -> None:
        self._receiver = receiver
        self._on_attach()

    def accept_input(self) -> None:
        if self._paused and self._loop is not None and not self._closed:
            self._loop.call_soon_threadsafe(self._resume)

    def close(self) -> None:
        self._closed = True
        self._stop_input()

    # -- hooks -------------------------------------------------------------------------------
    def _on_attach(self) -> None:
        """Called when a receiver is attached; back-ends with input start reading here."""

    def _read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def _filter_input(self, data: bytes) -> bytes:
        """Transform input before delivery (the stdio escape handling)."""
        return data

    def _on_eof(self) -> None:
        self._stop_input()

    def _on_read_error(self, err: OSError) -> None:
        log.debug("%s: read error %s; stopping input", self.label, err)
        self._stop_input()

    # -- input pump (loop thread) ------------------------------------------------------------
    def _start_input(self, fd: int) -> None:
        if self._loop is None:
            raise RuntimeError(f"{self.label}: input needs a main loop")
        self._stop_input()
        self._in_fd = fd
        self._paused = False
        self._watch()

    def _stop_input(self) -> None:
        self._unwatch()
        self._in_fd = None
        self._paused = False

    def _watch(self) -> None:
        assert self._loop is not None and self._in_fd is not None
        if self._pollless:
            self._loop.call_soon_threadsafe(self._on_readable)
            return
        try:
            self._loop.add_reader(self._in_fd, self._on_readable)
            self._watching = True
        except PermissionError:
            # epoll refuses regular files and /dev/null: they are always readable, so pump
            # them with call-soon instead (each round re-checks room and EOF).
            self._pollless = True
            self._loop.call_soon_threadsafe(self._on_readable)
        except OSError as e:  # e.g. stdin closed (EBADF): run without input
            log.warning("%s: cannot watch input fd %d (%s); no input", self.label, self._in_fd, e)
            self._in_fd = None

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None and self._in_fd is not None:
            self._loop.remove_reader(self._in_fd)
        self._watching = False

    def _on_readable(self) -> None:
        fd = self._in_fd
        rcv = self._receiver
        if fd is None or rcv is None or self._closed or self._paused:
            return
        room = rcv.can_receive()
        if room <= 0:
            self._pause()
            return
        try:
            data = self._read(fd, min(room, READ_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._on_read_error(e)
            return
        if not data:
            self._on_eof()
            return
        data = self._filter_input(data)
        if data:
            rcv.receive(data)
        if self._pollless and self._in_fd == fd and not self._paused and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_readable)

    def _pause(self) -> None:
        self._paused = True
        self._unwatch()
        # The guest may have drained the FIFO between can_receive() and the flag being set,
        # in which case its accept_input() saw _paused False and did nothing: re-check.
        rcv = self._receiver
        if rcv is not None and rcv.can_receive() > 0:
            self._resume()

    def _resume(self) -> None:
        if not self._paused or self._in_fd is None or self._closed:
            return
        self._paused = False
        self._watch()
