"""The epoll main loop: readers, cross-thread calls, timers, stop, IOThread."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pyvmm.loop import IOThread, MainLoop


@pytest.fixture
def loop():
    lp = MainLoop("test-loop")
    lp.start_thread()
    yield lp
    lp.stop_thread()
    lp.close()


def test_call_soon_threadsafe_runs_on_loop_thread(loop):
    seen = []
    done = threading.Event()

    def cb():
        seen.append(threading.current_thread().name)
        done.set()

    threading.Thread(target=lambda: loop.call_soon_threadsafe(cb)).start()
    assert done.wait(2.0)
    assert seen == ["test-loop"]


def test_call_later_order_and_cancel(loop):
    order = []
    done = threading.Event()
    t0 = time.monotonic()
    loop.call_later(0.06, lambda: (order.append("c"), done.set()))
    loop.call_later(0.02, lambda: order.append("a"))
    h = loop.call_later(0.04, lambda: order.append("cancelled"))
    loop.call_later(0.04, lambda: order.append("b"))
    h.cancel()
    assert done.wait(2.0)
    assert order == ["a", "b", "c"]
    assert time.monotonic() - t0 >= 0.06


def test_reader_and_remove_reader(loop):
    r, w = os.pipe()
    got = []
    ev = threading.Event()

    def on_read():
        got.append(os.read(r, 100))
        ev.set()

    try:
        loop.add_reader(r, on_read)
        os.write(w, b"ping")
        assert ev.wait(2.0)
        assert got == [b"ping"]
        assert loop.remove_reader(r)
        assert not loop.remove_reader(r)
        ev.clear()
        os.write(w, b"more")
        assert not ev.wait(0.1)  # no longer watched
    finally:
        os.close(r)
        os.close(w)


def test_failing_callback_does_not_stop_loop(loop, caplog):
    ev = threading.Event()
    loop.call_soon_threadsafe(lambda: 1 / 0)
    loop.call_soon_threadsafe(ev.set)
    assert ev.wait(2.0)
    assert "callback" in caplog.text


def test_run_on_calling_thread_and_stop_from_callback():
    lp = MainLoop("inline")
    try:
        ran = []
        lp.call_later(0.01, lambda: (ran.append(1), lp.stop()))
        t0 = time.monotonic()
        lp.run()
        assert ran == [1]
        assert time.monotonic() - t0 < 2.0
        # It can run again after stopping.
        lp.call_soon_threadsafe(lp.stop)
        lp.run()
    finally:
        lp.close()


def test_regular_file_is_refused_by_epoll(loop, tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(PermissionError):
            loop.add_reader(fd, lambda: None)
    finally:
        os.close(fd)


def test_iothread():
    with IOThread("io0") as io:
        ev = threading.Event()
        names = []
        io.loop.call_later(0.01, lambda: (names.append(threading.current_thread().name), ev.set()))
        assert ev.wait(2.0)
        assert names == ["io0"]
    assert not io.thread.is_alive()


def test_writer_and_reader_on_same_fd(loop):
    a, b = __import__("socket").socketpair()
    try:
        a.setblocking(False)
        wrote = threading.Event()
        readable = threading.Event()

        def on_write():
            a.send(b"w")
            loop.remove_writer(a.fileno())
            wrote.set()

        loop.add_reader(a.fileno(), readable.set)
        loop.add_writer(a.fileno(), on_write)
        assert wrote.wait(2.0)
        assert b.recv(10) == b"w"
        assert not readable.is_set()
        b.send(b"r")  # the reader survived the writer's removal
        assert readable.wait(2.0)
        assert loop.remove_reader(a.fileno())
    finally:
        a.close()
        b.close()
