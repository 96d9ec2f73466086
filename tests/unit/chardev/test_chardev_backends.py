"""Character back-ends with real fds: unix socket clients, a pty reader, files, the parser,
and back-pressure into a real UART model."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from pyvmm.chardev import (
    FileBackend,
    NullBackend,
    PtyBackend,
    StdioBackend,
    UnixSocketBackend,
    parse_chardev,
)
from pyvmm.devices.serial import Serial
from pyvmm.errors import ConfigError, DeviceError
from pyvmm.runstate import VmControl
from support.chardev_helpers import Collector, running_loop
from support.waiting import wait_until


@pytest.fixture
def loop():
    yield from running_loop("chardev-test")


def recv_exact(s: socket.socket, n: int, timeout: float = 3.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


# -- unix socket ---------------------------------------------------------------------------------
def test_unix_server_nowait_one_client_at_a_time(loop, tmp_path):
    path = str(tmp_path / "con.sock")
    be = parse_chardev(f"unix:{path},server=on,wait=off", loop, None)
    assert isinstance(be, UnixSocketBackend)
    rcv = Collector()
    be.attach(rcv)
    try:
        assert be.write(b"dropped") == 0  # nobody connected
        c1 = socket.socket(socket.AF_UNIX)
        c1.connect(path)
        assert wait_until(lambda: be.connected)
        c1.sendall(b"hello")
        assert rcv.wait_for(5) == b"hello"
        assert be.write(b"out") == 3
        assert recv_exact(c1, 3) == b"out"
        # A second client waits in the backlog while the first is served.
        c2 = socket.socket(socket.AF_UNIX)
        c2.connect(path)
        c2.sendall(b"X")
        time.sleep(0.1)
        assert rcv.wait_for(6, 0.1) == b"hello"
        c1.close()
        assert wait_until(lambda: rcv.wait_for(6, 0.01) == b"helloX"), "second client not served"
        assert be.write(b"2") == 1
        assert recv_exact(c2, 1) == b"2"
        c2.close()
        assert wait_until(lambda: not be.connected)
        assert be.write(b"gone") == 0
    finally:
        be.close()
    assert not os.path.exists(path)


def test_unix_server_wait_blocks_until_client(loop, tmp_path):
    path = str(tmp_path / "w.sock")
    result = {}

    def build():
        result["be"] = UnixSocketBackend(loop, path, server=True, wait=True)

    t = threading.Thread(target=build)
    t.start()
    assert wait_until(lambda: os.path.exists(path))
    time.sleep(0.05)
    assert t.is_alive()  # still waiting for a connection
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    t.join(3.0)
    be = result["be"]
    try:
        assert be.connected
        be.write(b"hi")
        assert recv_exact(c, 2) == b"hi"
    finally:
        c.close()
        be.close()


def test_unix_client_mode(loop, tmp_path):
    path = str(tmp_path / "srv.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    be = parse_chardev(f"unix:{path}", loop, None)
    conn, _ = srv.accept()
    rcv = Collector()
    be.attach(rcv)
    try:
        be.write(b"abc")
        assert recv_exact(conn, 3) == b"abc"
        conn.sendall(b"xyz")
        assert rcv.wait_for(3) == b"xyz"
    finally:
        conn.close()
        srv.close()
        be.close()
    with pytest.raises(DeviceError):
        parse_chardev(f"unix:{tmp_path / 'nothing.sock'}", loop, None)


def test_slow_socket_client_loses_nothing_then_overflow_drops(loop, tmp_path):
    path = str(tmp_path / "slow.sock")
    be = UnixSocketBackend(loop, path, server=True, wait=False)
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        assert wait_until(lambda: be.connected)
        # One-byte writes as a UART makes them, while the client is not reading: the kernel
        # socket buffer fills after a few hundred of these; the rest must be queued, in order.
        payload = bytes(i % 251 for i in range(20000))
        t0 = time.monotonic()
        for i in range(len(payload)):
            assert be.write(payload[i:i + 1]) == 1
        assert time.monotonic() - t0 < 2.0  # the vCPU never waited for the client
        assert recv_exact(c, len(payload)) == payload
        # A client that never reads: past the 1 MiB queue, output is dropped, quickly.
        t0 = time.monotonic()
        sent = sum(be.write(b"x" * 4096) for _ in range(600))  # 2.4 MiB
        assert time.monotonic() - t0 < 2.0
        assert sent < 600 * 4096
        c.close()
        assert wait_until(lambda: not be.connected)
        assert be.write(b"after") == 0
    finally:
        be.close()


# -- pty -----------------------------------------------------------------------------------------
def test_pty_backend_with_real_reader(loop, caplog):
    caplog.set_level("INFO")
    be = parse_chardev("pty", loop, None, label="serial0")
    assert isinstance(be, PtyBackend)
    assert f"char device redirected to {be.path} (label serial0)" in caplog.text
    rcv = Collector()
    be.attach(rcv)
    fd = os.open(be.path, os.O_RDWR | os.O_NOCTTY)
    try:
        be.write(b"guest says hi\n")
        buf = b""
        end = time.monotonic() + 3
        while b"\n" not in buf and time.monotonic() < end:
            buf += os.read(fd, 100)
        assert buf == b"guest says hi\n"  # raw: no \r inserted
        os.write(fd, b"typed")
        assert rcv.wait_for(5) == b"typed"
        # More than the pty buffer holds, written while the reader sleeps: queued, not lost.
        payload = bytes(range(256)) * 64
        for i in range(0, len(payload), 7):
            be.write(payload[i:i + 7])
        buf = b""
        end = time.monotonic() + 5
        while len(buf) < len(payload) and time.monotonic() < end:
            buf += os.read(fd, 65536)
        assert buf == payload
        # Nobody reading at all: output is dropped quickly instead of blocking the vCPU.
        t0 = time.monotonic()
        for _ in range(600):
            be.write(b"y" * 4096)
        assert time.monotonic() - t0 < 2.0
    finally:
        os.close(fd)
        be.close()


# -- file and null -------------------------------------------------------------------------------
def test_file_backend(tmp_path, loop):
    p = tmp_path / "out.log"
    p.write_bytes(b"old contents")
    be = parse_chardev(f"file:{p}", loop, None)
    assert isinstance(be, FileBackend)
    be.attach(Collector())  # no input: harmless
    assert be.write(b"line 1\n") == 7
    be.write(b"line 2\n")
    be.close()
    assert p.read_bytes() == b"line 1\nline 2\n"
    be2 = FileBackend(str(p), append=True)
    be2.write(b"more\n")
    be2.close()
    assert p.read_bytes().endswith(b"line 2\nmore\n")
    with pytest.raises(DeviceError):
        FileBackend(str(tmp_path / "no" / "such" / "dir"))


def test_null_and_none(loop):
    be = parse_chardev("null", loop, None)
    assert isinstance(be, NullBackend)
    assert be.write(b"abc") == 3
    be.close()
    assert parse_chardev("none", loop, None) is None


def test_parse_errors(loop, tmp_path):
    for bad in ("", "bogus", "file:", "unix:", f"unix:{tmp_path}/s,server=maybe",
                f"unix:{tmp_path}/s,wait=off", "stdio,colour=on", "pty:/dev/x", "tcp:1234"):
        with pytest.raises(ConfigError) as ei:
            parse_chardev(bad, loop, None)
        assert "\n" not in str(ei.value)


def test_parse_mon_prefix_and_file_append(loop, tmp_path):
    p = tmp_path / "a.log"
    p.write_bytes(b"keep\n")
    be = parse_chardev(f"mon:file:{p},append=on", loop, None)
    be.write(b"more\n")
    be.close()
    assert p.read_bytes() == b"keep\nmore\n"


def test_parse_old_server_nowait_spelling(loop, tmp_path):
    be = parse_chardev(f"unix:{tmp_path}/o.sock,server,nowait", loop, None)
    try:
        assert isinstance(be, UnixSocketBackend) and be.server and not be.connected
    finally:
        be.close()


def test_parse_stdio_with_pipe_stdin(loop, monkeypatch):
    r, w = os.pipe()
    try:
        be = StdioBackend(loop, in_fd=r, out_fd=w)
        assert not be.is_tty
        be.close()
    finally:
        os.close(r)
        os.close(w)


# -- back-pressure into the UART -----------------------------------------------------------------
def test_backpressure_pauses_and_resumes_reading(loop):
    be = PtyBackend(loop)
    uart = Serial(None, be)  # FIFOs off: room for exactly one byte
    fd = os.open(be.path, os.O_RDWR | os.O_NOCTTY)
    try:
        payload = bytes(range(33, 33 + 60))
        os.write(fd, payload)
        assert wait_until(lambda: uart.rx_count() == 1)
        time.sleep(0.05)
        assert uart.rx_count() == 1
        assert be._paused  # the fd is no longer watched while the UART is full
        got = bytearray()
        end = time.monotonic() + 5
        while len(got) < len(payload) and time.monotonic() < end:
            if uart.io_read(5, 1) & 0x01:  # LSR.DR
                got.append(uart.io_read(0, 1))
            else:
                time.sleep(0.001)
        assert bytes(got) == payload
    finally:
        os.close(fd)
        be.close()


def test_stdio_regular_file_input_is_pumped_without_epoll(loop, tmp_path):
    p = tmp_path / "in.txt"
    p.write_bytes(b"from a file")
    fd = os.open(p, os.O_RDONLY)
    r_out, w_out = os.pipe()
    try:
        be = StdioBackend(loop, in_fd=fd, out_fd=w_out, control=VmControl())
        rcv = Collector(room=4)
        be.attach(rcv)
        assert rcv.wait_for(4) == b"from"
        time.sleep(0.05)
        assert len(rcv.data) == 4  # receiver full: paused, not spinning past its room
        rcv.room = 100
        be.accept_input()
        assert rcv.wait_for(11) == b"from a file"
        be.close()
    finally:
        os.close(fd)
        os.close(r_out)
        os.close(w_out)
