"""The VM's serial console as a stream: everything the guest printed, readable and searchable.

A reader thread keeps the last :data:`KEEP` bytes; :meth:`Console.read` returns what arrived
since the previous read, :meth:`Console.expect` waits for a pattern, :meth:`Console.write`
types into the guest.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

from pyvmm.sdk.errors import VMError, VMTimeout
from pyvmm.unixsock import connect_unix

KEEP = 1 << 20


class Console:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        try:
            self._sock = connect_unix(path, timeout, poll=0.02)
        except OSError as e:
            raise VMError(f"cannot connect to the console socket {path}: {e.strerror}") from None
        self._cond = threading.Condition()
        self._data = bytearray()
        self._dropped = 0  # bytes dropped from the front of _data
        self._pos = 0  # read position, in bytes ever received
        self._eof = False
        threading.Thread(target=self._reader, name="pyvmm-sdk-console", daemon=True).start()

    def _reader(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._data += data
                if len(self._data) > KEEP:
                    cut = len(self._data) - KEEP
                    del self._data[:cut]
                    self._dropped += cut
                self._cond.notify_all()

    @property
    def text(self) -> str:
        """What is kept of the output (the last MiB), decoded."""
        with self._cond:
            return self._data.decode(errors="replace")

    def read(self, timeout: float = 0.0) -> bytes:
        """The output since the last read (waiting up to ``timeout`` for some); b"" at the end."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pos >= self._dropped + len(self._data) and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    return b""
                self._cond.wait(left)
            start = max(self._pos - self._dropped, 0)
            out = bytes(self._data[start:])
            self._pos = self._dropped + len(self._data)
            return out

    def expect(self, pattern: str | bytes, timeout: float = 60.0) -> re.Match[bytes]:
        """Wait for ``pattern`` (a regex) in the output after the read position; consumes up to its end."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = max(self._pos - self._dropped, 0)
                m = rx.search(self._data, start)
                if m:
                    self._pos = self._dropped + m.end()
                    return m
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise VMTimeout(f"{rx.pattern!r} not seen on the console within {timeout:g}s")
                self._cond.wait(left)

    def write(self, data: bytes | str) -> None:
        try:
            self._sock.sendall(data.encode() if isinstance(data, str) else data)
        except OSError as e:
            raise VMError(f"console: {e.strerror or e}") from None

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
