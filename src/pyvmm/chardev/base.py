"""Character back-ends: the protocol and the shared input/output plumbing.

A *front-end* (a UART, a virtio console) talks to a :class:`CharBackend`:

* output: ``backend.write(data)`` from a vCPU thread.  It must not block the
  vCPU for long, so back-ends whose peer can stall (socket, pty) wait a short,
  bounded time and then drop output, as QEMU does for a disconnected pty.
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
import select
import time
from typing import Protocol

from pyvmm.loop import MainLoop

log = logging.getLogger(__name__)

#: Largest single read from an input fd.
READ_CHUNK = 4096


class CharReceiver(Protocol):
    """A front-end that accepts input bytes (called on the loop thread)."""

    def can_receive(self) -> int:
        """How many bytes the front-end can take now (0 = stop reading)."""
        ...

    def receive(self, data: bytes) -> None: ...


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


def write_bounded(fd: int, data: bytes, timeout: float) -> int:
    """Write ``data`` to a non-blocking ``fd``, waiting at most ``timeout`` seconds in total.

    Returns the number of bytes written.  Raises OSError for hard errors (EPIPE, EIO, ...).
    """
    view = memoryview(data)
    done = 0
    deadline = None
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
            continue
        except BlockingIOError:
            pass
        except InterruptedError:
            continue
        now = time.monotonic()
        if deadline is None:
            deadline = now + timeout
        remaining = deadline - now
        if remaining <= 0:
            break
        p = select.poll()
        p.register(fd, select.POLLOUT)
        p.poll(remaining * 1000)
    return done


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
