"""A small synchronous QMP client for the SDK: commands in order, events kept for the caller.

A reader thread parses the monitor's JSON lines: replies go to the waiting command, events to a
bounded list (:data:`MAX_EVENTS`) that :meth:`QmpConnection.wait_event` searches.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pyvmm.sdk.errors import QMPError, VMError, VMTimeout
from pyvmm.unixsock import connect_unix

MAX_EVENTS = 1000
MAX_LINE = 16 << 20


class QmpConnection:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        try:
            self._sock = connect_unix(path, timeout)
        except OSError as e:
            raise VMError(f"cannot connect to the QMP socket {path}: {e.strerror}") from None
        self._cond = threading.Condition()
        self._replies: collections.deque[dict[str, Any]] = collections.deque()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self._seen = 0  # events ever received (wait_event counts from here)
        self._closed = False
        self._cmd_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name="pyvmm-sdk-qmp", daemon=True)
        self._reader.start()
        greeting = self._next_reply(timeout)
        if "QMP" not in greeting:
            raise VMError(f"not a QMP greeting: {greeting!r:.80}")
        self.command("qmp_capabilities")

    def _read_loop(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line, buf = bytes(buf[:nl]), buf[nl + 1:]
                    if line.strip():
                        self._dispatch(json.loads(line))
                if len(buf) > MAX_LINE:
                    break
        except (OSError, ValueError):
            pass
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        with self._cond:
            if "event" in msg:
                self.events.append(msg)
                self._seen += 1
            else:
                self._replies.append(msg)
            self._cond.notify_all()

    def _next_reply(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._replies:
                left = deadline - time.monotonic()
                if self._closed:
                    raise VMError("the QMP connection closed (the VM has exited)")
                if left <= 0:
                    raise VMTimeout(f"no QMP reply within {timeout:g}s")
                self._cond.wait(left)
            return self._replies.popleft()

    def command(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        with self._cmd_lock:
            try:
                self._sock.sendall(json.dumps(msg).encode() + b"\n")
            except OSError as e:
                raise VMError(f"QMP {name}: {e.strerror or e} (the VM has exited?)") from None
            reply = self._next_reply(timeout)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(name, str(err.get("class", "GenericError")), str(err.get("desc", err)))
        return reply.get("return")

    def wait_event(self, name: str | None, timeout: float, since: int = 0) -> dict[str, Any]:
        """The first event called ``name`` (any if None) among those numbered ``since`` and later."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                first = self._seen - len(self.events)
                for i, ev in enumerate(self.events):
                    if first + i >= since and (name is None or ev.get("event") == name):
                        return ev
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise VMTimeout(f"no QMP event {name or ''} within {timeout:g}s".replace("  ", " "))
                self._cond.wait(left)

    @property
    def event_count(self) -> int:
        with self._cond:
            return self._seen

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
