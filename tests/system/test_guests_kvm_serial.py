"""Serial console end to end on KVM: stdin pipes, files, unix sockets, ptys, a real
terminal, and the 16550A registers as drivers probe them."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import socket
import subprocess
import sys
import termios
import time
import tty

import pytest

from conftest import ALL_CHECKS, debug_exit_status, pyvmm_process, run_pyvmm_kvm

pytestmark = pytest.mark.usefixtures("kvm")


def test_realmode_serial_to_file(guests, tmp_path):
    out = tmp_path / "serial.log"
    r = run_pyvmm_kvm("--serial", f"file:{out}", "--kernel", guests["realmode_hello"])
    assert r.returncode == debug_exit_status(0x2A), r.describe()
    assert out.read_bytes().replace(b"\r", b"") == b"Hello from real mode\n"
    assert "Hello" not in r.stdout


def test_serial_echo_from_stdin_pipe(guests):
    r = run_pyvmm_kvm("--kernel", guests["serial_echo"], input=b"hello World.")
    assert r.returncode == debug_exit_status(11), r.describe()
    assert r.serial == "echo ready\nHELLO WORLD\nbye\n", r.describe()


def test_serial_echo_long_input_not_dropped(guests):
    """More input than the 16-byte UART FIFO holds: the back-end must wait, not drop."""
    text = bytes(ord("a") + i % 26 for i in range(300))
    r = run_pyvmm_kvm("--kernel", guests["serial_echo"], input=text + b".", timeout=90)
    assert r.returncode == debug_exit_status(300 & 0x7F), r.describe()
    assert r.serial == "echo ready\n" + text.decode().upper() + "\nbye\n", r.describe()


def _read_until(read, marker: bytes, timeout: float) -> bytes:
    """Call ``read()`` (returns bytes, b"" at EOF) until ``marker`` was seen or time is up."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data and time.monotonic() < deadline:
        chunk = read()
        if chunk is None:
            time.sleep(0.02)
            continue
        if not chunk:
            break
        data += chunk
    return data


def test_serial_unix_socket_server(guests, tmp_path):
    sock_path = tmp_path / "com1.sock"
    with pyvmm_process("--accel", "kvm", "--device", "isa-debug-exit", "--kernel", guests["serial_echo"],
                       "--serial", f"unix:{sock_path},server=on,wait=off") as proc:
        deadline = time.monotonic() + 20
        while not sock_path.exists():
            assert proc.poll() is None, proc.communicate()[1].decode(errors="replace")
            assert time.monotonic() < deadline, "pyvmm never created the serial socket"
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
            s.settimeout(0.5)
            s.sendall(b"abc")

            def read() -> bytes | None:
                try:
                    return s.recv(4096)
                except TimeoutError:
                    return None

            # Both directions before the guest exits: output after exit may be lost with the socket.
            data = _read_until(read, b"ABC", 30)
            assert b"ABC" in data, data
            s.sendall(b".")
            assert proc.wait(timeout=30) == debug_exit_status(3), data


def test_serial_pty(guests):
    with pyvmm_process("--accel", "kvm", "--device", "isa-debug-exit", "--kernel", guests["serial_echo"],
                       "--serial", "pty") as proc:
        path = None
        for line in proc.stderr:
            m = re.search(rb"char device redirected to (/dev/pts/\d+)", line)
            if m:
                path = m.group(1).decode()
                break
        assert path, "pyvmm did not report the pty path on stderr"
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            os.write(fd, b"xyz")

            def read() -> bytes | None:
                try:
                    return os.read(fd, 4096)
                except BlockingIOError:
                    return None

            # Both directions before the guest exits: a pty hang-up discards unread output.
            data = _read_until(read, b"XYZ", 30)
            assert b"XYZ" in data, data
            os.write(fd, b".")
            assert proc.wait(timeout=30) == debug_exit_status(3), data
        finally:
            os.close(fd)


def test_serial_stdio_on_a_terminal_ctrl_a_x_quits_and_restores(guests):
    """stdin a terminal (pyvmm's controlling tty): raw input reaches the guest, Ctrl-A x quits
    with status 0 and the terminal settings are restored."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)

    def make_controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", "kvm", "--device", "isa-debug-exit",
           "--kernel", str(guests["serial_echo"])]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=make_controlling_tty)
    try:
        os.set_blocking(proc.stdout.fileno(), False)

        def read() -> bytes | None:
            return proc.stdout.read() or None

        out = _read_until(read, b"echo ready\n", 30)
        os.write(master, b"ab")
        out += _read_until(read, b"AB", 30)
        assert b"AB" in out, out
        os.write(master, b"\x01x")
        status = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    err = proc.stderr.read().decode(errors="replace")
    assert status == 0, err
    assert after == before, "terminal settings not restored"


def test_serial_null_backend(guests):
    r = run_pyvmm_kvm("--serial", "null", "--kernel", guests["realmode_hello"])
    assert r.returncode == debug_exit_status(0x2A), r.describe()
    assert "Hello" not in r.stdout


def test_uart_registers(guests):
    r = run_pyvmm_kvm("--kernel", guests["uart_regs"])
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    assert "#" not in r.serial, "loopback bytes leaked to the back-end:\n" + r.describe()
