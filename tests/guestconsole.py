"""Drive a guest's serial console from a test, expect-style.

``ConsoleProcess`` runs ``python -m pyvmm run ...`` with the serial port on the
process's stdin/stdout (the stdio back-end with pipes), keeps everything the
guest printed, and lets a test wait for text and type commands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "~ # "
READY = "pyvmm-guest: shell ready"


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
        text = self.output[start:m.start()]
        echo = text.find(f"echo {marker}")
        body = text[echo + len(f"echo {marker}"):] if echo >= 0 else text
        return body.replace("\r", "").strip("\n")

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


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)
