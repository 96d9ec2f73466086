"""Connecting to a unix socket that another process creates some time after it starts."""

from __future__ import annotations

import socket
import time
from pathlib import Path


def connect_unix(path: str | Path, timeout: float, poll: float = 0.05) -> socket.socket:
    """A connected stream socket to ``path``, retried until ``timeout`` seconds have passed.

    Raises the last connect's OSError when the time is up.
    """
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(poll)
