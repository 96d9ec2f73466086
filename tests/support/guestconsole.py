"""Drive a guest's serial console from a test, expect-style.

``ConsoleProcess`` runs ``python -m pyvmm run ...`` with the serial port on the
process's stdin/stdout (the stdio back-end with pipes), keeps everything the
guest printed, and lets a test wait for text and type commands.
``SocketConsole`` does the same for a console a VMM (pyvmm or QEMU) serves on a
unix socket, e.g. ``-serial unix:PATH,server=on,wait=off`` or a virtio-console
``--chardev socket``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "~ # "
READY = "pyvmm-guest: shell ready"


def connect_unix(path: Path, timeout: float = 30.0) -> socket.socket:
    """A connected unix stream socket to ``path``, retried until ``timeout``: a VMM creates its
    sockets some time after it starts.  The last error is raised when time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ConsoleProcess:
    def __init__(self, *args: str | os.PathLike, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "pyvmm", "run", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        self._out = bytearray()
        self._err = bytearray()
        self._lock = threading.Lock()
        self._mark = 0
        for stream, buf in ((self.proc.stdout, self._out), (self.proc.stderr, self._err)):
            threading.Thread(target=self._pump, args=(stream, buf), daemon=True).start()

    def _pump(self, stream, buf: bytearray) -> None:
        while True:
            data = stream.read1(65536)
            if not data:
                return
            with self._lock:
                buf += data

    @property
    def output(self) -> str:
        with self._lock:
            return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.decode(errors="replace")

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) in the output after the last match; returns the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.output
            m = rx.search(text, self._mark)
            if m:
                self._mark = m.end()
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"pyvmm exited with {self.proc.returncode}" if self.proc.poll() is not None else \
                    f"not seen within {timeout}s"
                raise AssertionError(f"{pattern!r}: {why}\n--- console tail ---\n{text[-2000:]}\n"
                                     f"--- stderr ---\n{self.stderr[-2000:]}")
            time.sleep(0.05)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float = 60) -> str:
        """Type a shell command and return what it printed (between the echo and the next prompt)."""
        marker = f"__done_{time.monotonic_ns()}__"
        self.send(f"{command}; echo {marker}\n")
        start = self._mark
        m = self.expect(r"(?m)^" + re.escape(marker) + r"\r?$", timeout)  # the output, not the typed echo
        # The typed line comes back through the shell's line editor, which may redraw it with CRs
        # and escape sequences: drop those, then take what follows the marker in that echo.
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", self.output[start:m.start()])
        echo = text.rfind(marker)
        body = text[echo + len(marker):] if echo >= 0 else text
        return body.strip("\n")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"pyvmm did not exit within {timeout}s\n{self.output[-2000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SocketConsole:
    """A guest console on a unix socket: everything read is kept, a test waits for text and types.

    The VMM creates the socket some time after it starts, so connecting is
    retried until ``timeout``.  A reader thread drains the socket continuously:
    a console nobody reads would fill the VMM's output buffer and stall the guest.
    """

    def __init__(self, path: Path, timeout: float = 30.0, name: str = "the console") -> None:
        self.name = name
        self.sock = connect_unix(path, timeout)
        self._data = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._data += data

    @property
    def text(self) -> str:
        """Everything received so far (decoded as a whole, so split UTF-8 sequences survive)."""
        with self._lock:
            return self._data.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        """Wait until ``needle`` (plain text) has been received at any point."""
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} on {self.name} within {timeout}s; tail:\n{self.text[-1500:]}")
            time.sleep(0.05)

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def close(self) -> None:
        """Shut the socket down (which also ends the reader thread) and close it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)
