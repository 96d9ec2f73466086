"""The stdio back-end with a real pty standing in for the user's terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from pyvmm.chardev import StdioBackend, parse_chardev
from pyvmm.runstate import RequestKind, VmControl
from support.chardev_helpers import Collector, running_loop


@pytest.fixture
def loop():
    yield from running_loop("stdio-test")


@pytest.fixture
def term():
    """(master, slave) of a pty in cooked mode; the slave plays the user's terminal."""
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def read_master(master: int, until: bytes, timeout: float = 3.0) -> bytes:
    os.set_blocking(master, False)
    buf = b""
    end = time.monotonic() + timeout
    while until not in buf and time.monotonic() < end:
        try:
            buf += os.read(master, 1024)
        except BlockingIOError:
            time.sleep(0.005)
    return buf


def test_raw_mode_and_restore_on_close(loop, term):
    master, slave = term
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON and before[3] & termios.ECHO
    be = StdioBackend(loop, in_fd=slave, out_fd=slave, control=VmControl())
    assert be.is_tty
    raw = termios.tcgetattr(slave)
    assert not raw[3] & (termios.ICANON | termios.ECHO | termios.IEXTEN)
    assert raw[3] & termios.ISIG  # Ctrl-C still stops pyvmm, as with QEMU's default
    assert not raw[0] & (termios.ICRNL | termios.IXON)
    assert raw[1] & termios.OPOST
    assert raw[6][termios.VMIN] == 1
    be.close()
    assert termios.tcgetattr(slave) == before
    be.close()  # idempotent


def test_signal_off_clears_isig(loop, term):
    master, slave = term
    be = parse_chardev("stdio,signal=off", loop, VmControl())
    be.close()  # the real stdin of the test run is not a tty: nothing to check there
    be = StdioBackend(loop, in_fd=slave, out_fd=slave, allow_signals=False)
    try:
        assert not termios.tcgetattr(slave)[3] & termios.ISIG
    finally:
        be.close()


def test_input_output_and_escapes(loop, term):
    master, slave = term
    control = VmControl()
    be = StdioBackend(loop, in_fd=slave, out_fd=slave, control=control)
    rcv = Collector()
    be.attach(rcv)
    try:
        be.write(b"login: ")
        assert b"login: " in read_master(master, b"login: ")
        os.write(master, b"root\r")  # raw: CR is not turned into LF, no echo
        assert rcv.wait_for(5) == b"root\r"
        os.write(master, b"a\x01\x01b")  # C-a C-a sends one C-a
        assert rcv.wait_for(8) == b"root\ra\x01b"
        os.write(master, b"\x01h")
        assert b"C-a x" in read_master(master, b"C-a C-a")
        assert not control.pending()
    finally:
        be.close()


def test_ctrl_a_x_requests_exit_and_restores(loop, term):
    master, slave = term
    before = termios.tcgetattr(slave)
    control = VmControl()
    be = StdioBackend(loop, in_fd=slave, out_fd=slave, control=control)
    rcv = Collector()
    be.attach(rcv)
    try:
        os.write(master, b"q\x01x")
        req = control.wait(3.0)
        assert req is not None and req.kind is RequestKind.EXIT and req.status == 0
        assert rcv.wait_for(1) == b"q"
        assert termios.tcgetattr(slave) == before  # restored right away
    finally:
        be.close()
    assert termios.tcgetattr(slave) == before


def test_on_quit_callback(loop, term):
    master, slave = term
    quit_ev = threading.Event()
    be = StdioBackend(loop, in_fd=slave, out_fd=slave, on_quit=quit_ev.set)
    be.attach(Collector())
    try:
        os.write(master, b"\x01x")
        assert quit_ev.wait(3.0)
    finally:
        be.close()


def test_pipe_stdin_eof_stops_reading(loop):
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    be = StdioBackend(loop, in_fd=r, out_fd=out_w)
    rcv = Collector()
    be.attach(rcv)
    try:
        assert not be.is_tty
        os.write(w, b"piped")
        assert rcv.wait_for(5) == b"piped"
        os.close(w)
        w = -1
        time.sleep(0.05)  # EOF seen: the reader is gone, so the loop does not spin on it
        assert be._in_fd is None
        be.write(b"out")
        assert os.read(out_r, 10) == b"out"
    finally:
        be.close()
        for fd in (r, out_r, out_w, w):
            if fd >= 0:
                os.close(fd)


# The child starts with the signals at their defaults, as from a shell: under nohup (SIGHUP ignored,
# inherited across exec) the backend rightly leaves an ignored signal alone.
CHILD = r"""
import os, signal, sys, time
for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_DFL)
from pyvmm.chardev import StdioBackend
from pyvmm.loop import MainLoop
fd = int(sys.argv[1])
loop = MainLoop()
be = StdioBackend(loop, in_fd=fd, out_fd=fd)
print("raw", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminal_restored_when_killed_by_signal(term, sig):
    master, slave = term
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(slave)], pass_fds=(slave,),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "raw"
        assert not termios.tcgetattr(slave)[3] & termios.ICANON
        proc.send_signal(sig)
        assert proc.wait(10) == -sig  # still dies of the signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert termios.tcgetattr(slave) == before


def test_terminal_restored_at_interpreter_exit(term):
    master, slave = term
    before = termios.tcgetattr(slave)
    code = CHILD.replace("time.sleep(30)", "sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code, str(slave)], pass_fds=(slave,),
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 3, proc.stderr
    assert termios.tcgetattr(slave) == before


BACKGROUND_CHILD = r"""
import fcntl, os, sys, termios
fd = int(sys.argv[1])
os.setsid()
fcntl.ioctl(fd, termios.TIOCSCTTY, 0)      # the pty is now our controlling terminal
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)                        # a background job of that terminal
    from pyvmm.chardev import StdioBackend
    from pyvmm.loop import MainLoop
    loop = MainLoop()
    be = StdioBackend(loop, in_fd=fd, out_fd=1)
    print("background", be._background, flush=True)
    be.close()
    os._exit(0)
_, status = os.waitpid(pid, os.WUNTRACED)
print("stopped" if os.WIFSTOPPED(status) else f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
if os.WIFSTOPPED(status):
    os.kill(pid, 9)
"""


def test_background_job_leaves_terminal_alone(term):
    master, slave = term
    before = termios.tcgetattr(slave)
    proc = subprocess.run([sys.executable, "-c", BACKGROUND_CHILD, str(slave)], pass_fds=(slave,),
                          capture_output=True, text=True, timeout=20)
    assert proc.stdout.split("\n")[:2] == ["background True", "exit 0"], proc.stdout + proc.stderr
    assert termios.tcgetattr(slave) == before
