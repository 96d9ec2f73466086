"""The main loop: fd readiness, cross-thread calls and timers, in one thread.

This mirrors QEMU's ``util/main-loop.c``: back-ends (character devices,
sockets, tap, the monitor) register file descriptors with the loop (readers,
and writers for draining buffered output), and their
callbacks run on the loop's thread, never on a vCPU thread.  vCPU threads and
devices that need something done on the loop thread use
:meth:`MainLoop.call_soon_threadsafe`, which queues the call and wakes the
loop through an eventfd.  Timers (:meth:`MainLoop.call_later`) are a heap
ordered by monotonic deadline.

Thread safety: every public method may be called from any thread.  Callbacks
always run on the loop thread.  An exception in a callback is logged and the
loop keeps running, so one broken back-end cannot stop the others.

:class:`IOThread` is the same loop started in a thread of its own, like
QEMU's ``-object iothread``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], object]


class TimerHandle:
    """A pending :meth:`MainLoop.call_later` call; :meth:`cancel` stops it from running."""

    __slots__ = ("when", "seq", "fn", "cancelled")

    def __init__(self, when: float, seq: int, fn: Callback) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: TimerHandle) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class MainLoop:
    """An epoll loop with readers, thread-safe call-soon and timers."""

    def __init__(self, name: str = "main-loop") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._lock = threading.Lock()
        self._handlers: dict[int, tuple[Callback | None, Callback | None]] = {}  # fd -> (reader, writer)
        self._soon: deque[Callback] = deque()
        self._timers: list[TimerHandle] = []
        self._seq = itertools.count()
        self._stopping = False
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop_thread_id: int | None = None

    # -- registration ------------------------------------------------------------------------
    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable (level-triggered).

        Raises ``PermissionError`` for fds epoll cannot watch (regular files, /dev/null);
        callers that accept such inputs handle that themselves.
        """
        self._set_handler(fd, 0, callback)

    def remove_reader(self, fd: int) -> bool:
        """Stop watching ``fd`` for input.  Returns whether it was being watched."""
        return self._set_handler(fd, 0, None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is writable (level-triggered)."""
        self._set_handler(fd, 1, callback)

    def remove_writer(self, fd: int) -> bool:
        return self._set_handler(fd, 1, None)

    def _set_handler(self, fd: int, slot: int, callback: Callback | None) -> bool:
        """Install or clear the reader (slot 0) or writer (slot 1) of ``fd``; epoll mask follows."""
        with self._lock:
            old = self._handlers.get(fd, (None, None))
            had = old[slot] is not None
            new = (callback, old[1]) if slot == 0 else (old[0], callback)
            mask = (select.EPOLLIN if new[0] else 0) | (select.EPOLLOUT if new[1] else 0)
            if not mask:
                if fd in self._handlers:
                    del self._handlers[fd]
                    try:
                        self._epoll.unregister(fd)
                    except (OSError, ValueError):
                        pass  # fd already closed: the kernel dropped it from the epoll set
                return had
            if fd in self._handlers:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.register(fd, mask)
            self._handlers[fd] = new
            return had

    def call_soon_threadsafe(self, fn: Callback) -> None:
        """Run ``fn()`` on the loop thread as soon as possible; safe from any thread."""
        self._soon.append(fn)  # deque.append is atomic
        self._wake()

    def call_later(self, delay: float, fn: Callback) -> TimerHandle:
        """Run ``fn()`` on the loop thread after ``delay`` seconds; safe from any thread."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), next(self._seq), fn)
        with self._lock:
            heapq.heappush(self._timers, handle)
            first = self._timers[0] is handle
        if first and not self.in_loop_thread():
            self._wake()
        return handle

    def in_loop_thread(self) -> bool:
        return self._loop_thread_id == threading.get_ident()

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (BlockingIOError, OSError):
            pass  # counter saturated (already awake) or loop closed

    # -- running -----------------------------------------------------------------------------
    def run(self) -> None:
        """Run until :meth:`stop` is called (from any thread or from a callback)."""
        with self._lock:
            if self._running:
                raise RuntimeError(f"{self.name}: loop is already running")
            if self._closed:
                raise RuntimeError(f"{self.name}: loop is closed")
            self._running = True
            self._stopping = False
        self._loop_thread_id = threading.get_ident()
        try:
            while not self._stopping:
                self._run_once()
        finally:
            self._loop_thread_id = None
            with self._lock:
                self._running = False

    def _run_once(self) -> None:
        timeout = self._next_timeout()
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = []
        for fd, mask in events:
            if fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            handlers = self._handlers.get(fd)
            if handlers is None:
                continue
            reader, writer = handlers
            if reader is not None and mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self._invoke(reader)
            if writer is not None and mask & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR):
                # Looked up again: the reader may have removed it (e.g. on disconnect).
                writer = self._handlers.get(fd, (None, None))[1]
                if writer is not None:
                    self._invoke(writer)
        self._run_timers()
        # Only the calls queued so far: a callback that re-queues itself runs next round.
        for _ in range(len(self._soon)):
            self._invoke(self._soon.popleft())

    def _next_timeout(self) -> float:
        if self._soon or self._stopping:
            return 0
        with self._lock:
            while self._timers and self._timers[0].cancelled:
                heapq.heappop(self._timers)
            if not self._timers:
                return -1
            return max(0.0, self._timers[0].when - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        due: list[TimerHandle] = []
        with self._lock:
            while self._timers and self._timers[0].when <= now:
                due.append(heapq.heappop(self._timers))
        for h in due:
            if not h.cancelled:
                self._invoke(h.fn)

    def _invoke(self, cb: Callback) -> None:
        try:
            cb()
        except Exception:
            log.exception("%s: callback %r failed", self.name, cb)

    def stop(self) -> None:
        """Ask the loop to return from :meth:`run` after the current iteration; thread-safe."""
        self._stopping = True
        self._wake()

    # -- own thread --------------------------------------------------------------------------
    def start_thread(self, daemon: bool = True) -> threading.Thread:
        """Run the loop in a new thread named after the loop; returns the thread."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"{self.name}: loop thread already started")
        started = threading.Event()

        def body() -> None:
            self.call_soon_threadsafe(started.set)
            self.run()

        self._thread = threading.Thread(target=body, name=self.name, daemon=daemon)
        self._thread.start()
        started.wait(5.0)
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop_thread(self, timeout: float | None = 5.0) -> None:
        """Stop the loop thread started by :meth:`start_thread` and wait for it."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        """Release the epoll and eventfd.  The loop must not be running."""
        if self._closed:
            return
        if self._running and not self.in_loop_thread():
            self.stop_thread()
        self._closed = True
        with self._lock:
            self._handlers.clear()
            self._timers.clear()
        self._epoll.close()
        os.close(self._wake_fd)


class IOThread:
    """A :class:`MainLoop` running in a thread of its own (QEMU's ``-object iothread``)."""

    def __init__(self, name: str = "iothread") -> None:
        self.name = name
        self.loop = MainLoop(name=name)
        self.thread = self.loop.start_thread()

    def stop(self, timeout: float | None = 5.0) -> None:
        self.loop.stop_thread(timeout)
        self.loop.close()

    def __enter__(self) -> IOThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
