"""A QGA client: JSON commands to ``qemu-ga`` over the unix socket of its virtio-serial port.

The protocol, as QEMU documents it (docs/interop/qemu-ga-ref): one JSON object per command,
one per reply.  A connection may start in the middle of an earlier client's exchange, and the
agent may not be running yet, so every session begins with ``guest-sync-delimited``: the
client sends a 0xFF byte (the agent's parser resets on it) and the command with a random id;
the agent answers with a 0xFF byte and then the id; everything before the 0xFF is stale.  The
sync is repeated until the agent answers or the deadline passes.

File data travels base64-encoded (``buf-b64``); ``guest-exec`` takes ``input-data`` and
returns ``out-data``/``err-data`` the same way.  Replies are bounded (:data:`MAX_REPLY`) so a
confused peer cannot make the host buffer without limit.

Thread-safety: one command at a time per client (a lock around each exchange).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.qga.errors import QgaCommandError, QgaError, QgaTimeout
from pyvmm.unixsock import connect_unix

log = logging.getLogger(__name__)

DELIMITER = b"\xff"
#: Largest reply accepted (qemu-ga returns at most 48 MiB of file data per read, base64: 64 MiB).
MAX_REPLY = 80 << 20
#: Bytes per guest-file-read / guest-file-write exchange.
READ_CHUNK = 1 << 20
WRITE_CHUNK = 256 << 10


@dataclass(frozen=True)
class ExecStatus:
    """``guest-exec-status``: ``exited``; then ``exitcode`` or ``signal``; captured output."""

    exited: bool
    exitcode: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@dataclass(frozen=True)
class ExecResult:
    """A finished command, shaped like :class:`subprocess.CompletedProcess`.

    ``returncode`` is the exit status, or ``-N`` when signal N ended it (as subprocess does).
    """

    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None

    def check_returncode(self) -> None:
        if self.returncode:
            raise QgaError(f"{self.args[0] if self.args else 'command'} exited with status {self.returncode}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise QgaError(f"the agent sent invalid base64: {e}") from None


class QgaClient:
    """One connection to a guest agent.  ``connect`` (or the constructor's ``path``) opens it."""

    def __init__(self, path: str | Path | None = None, *, timeout: float = 60.0) -> None:
        self.path = Path(path) if path is not None else None
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._lock = threading.Lock()
        if path is not None:
            self.connect(path)

    # -- connection ----------------------------------------------------------------------------
    def connect(self, path: str | Path, timeout: float = 30.0) -> None:
        """Connect to the socket (retried until ``timeout``: the VMM creates it some time after start)."""
        self.close()
        self.path = Path(path)
        try:
            self._sock = connect_unix(self.path, timeout)
        except OSError as e:
            raise QgaError(f"cannot connect to the guest agent socket {self.path}: {e.strerror}") from None
        self._buf.clear()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> QgaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise QgaError("not connected to a guest agent")
        return self._sock

    def _send(self, data: bytes) -> None:
        try:
            self._socket().sendall(data)
        except OSError as e:
            raise QgaError(f"guest agent connection lost: {e.strerror or e}") from None

    def _fill(self, deadline: float) -> None:
        sock = self._socket()
        left = deadline - time.monotonic()
        if left <= 0:
            raise QgaTimeout("the guest agent did not answer in time")
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            raise QgaTimeout("the guest agent did not answer in time") from None
        except OSError as e:
            raise QgaError(f"guest agent connection lost: {e.strerror or e}") from None
        if not data:
            raise QgaError("the guest agent closed the connection")
        self._buf += data
        if len(self._buf) > MAX_REPLY:
            self._buf.clear()
            raise QgaError(f"the guest agent sent more than {MAX_REPLY} bytes without a complete reply")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        """The next JSON object (one per line; qemu-ga ends each with a newline)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).strip(b"\r\n\xff ")
                del self._buf[:nl + 1]
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise QgaError(f"the guest agent sent something that is not JSON: {line[:80]!r}") from None
                if not isinstance(msg, dict):
                    raise QgaError(f"the guest agent sent a non-object: {line[:80]!r}")
                return msg
            self._fill(deadline)

    # -- the handshake -------------------------------------------------------------------------
    def sync(self, timeout: float | None = None, retry: float = 1.0) -> None:
        """``guest-sync-delimited`` until the agent answers with our id (0xFF first); stale input is dropped."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            while True:
                ident = random.randrange(1, 1 << 31)
                self._send(DELIMITER + json.dumps({"execute": "guest-sync-delimited",
                                                   "arguments": {"id": ident}}).encode() + b"\n")
                attempt_end = min(deadline, time.monotonic() + retry)
                try:
                    if self._await_sync(ident, attempt_end):
                        return
                except QgaTimeout:
                    if time.monotonic() >= deadline:
                        raise QgaTimeout("the guest agent did not answer guest-sync-delimited "
                                         f"within {timeout if timeout is not None else self.timeout:g}s") from None
                retry = min(retry * 1.5, 5.0)

    def _await_sync(self, ident: int, deadline: float) -> bool:
        while True:
            pos = self._buf.find(DELIMITER)
            if pos >= 0:
                del self._buf[:pos + 1]
                break
            self._buf.clear()
            self._fill(deadline)
        while True:
            msg = self._read_message(deadline)
            if msg.get("return") == ident:
                return True
            log.debug("qga: dropping a stale reply while syncing: %.80s", msg)

    # -- commands ------------------------------------------------------------------------------
    def command(self, name: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Execute ``name`` with ``arguments`` (Python names: ``input_data`` -> ``input-data``); its return."""
        args = {k.replace("_", "-"): v for k, v in arguments.items() if v is not None}
        return self.execute(name, args, timeout=timeout)

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                expect_reply: bool = True) -> Any:
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = dict(arguments)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            self._send(json.dumps(request).encode() + b"\n")
            if not expect_reply:
                return None
            while True:
                msg = self._read_message(deadline)
                if "return" in msg:
                    return msg["return"]
                if "error" in msg:
                    err = msg["error"] if isinstance(msg["error"], dict) else {}
                    raise QgaCommandError(name, str(err.get("class", "GenericError")), str(err.get("desc", err)))
                log.debug("qga: ignoring %.80s", msg)

    # -- plain commands ------------------------------------------------------------------------
    def ping(self) -> None:
        self.execute("guest-ping")

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.execute("guest-info")
        return result

    def osinfo(self) -> dict[str, Any]:
        result: dict[str, Any] = self.execute("guest-get-osinfo")
        return result

    def network_interfaces(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.execute("guest-network-get-interfaces")
        return result

    def shutdown(self, mode: str = "powerdown") -> None:
        """``guest-shutdown``: the agent sends no reply when it succeeds."""
        if mode not in ("powerdown", "halt", "reboot"):
            raise ValueError(f"shutdown mode {mode!r}: use powerdown, halt or reboot")
        try:
            self.execute("guest-shutdown", {"mode": mode}, timeout=2.0)
        except QgaTimeout:
            pass  # success: no reply
        except QgaError as e:
            if isinstance(e, QgaCommandError):
                raise
            # the connection went away as the guest powered off: that is success too

    # -- guest-exec ----------------------------------------------------------------------------
    def exec_start(self, argv: Sequence[str], *, env: Mapping[str, str] | Sequence[str] | None = None,
                   input: bytes | None = None, capture_output: bool = True) -> int:
        """``guest-exec``: start ``argv`` (``argv[0]`` is looked up in the guest's PATH); its pid."""
        if not argv:
            raise ValueError("guest-exec needs a program")
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture_output}
        if env is not None:
            args["env"] = [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env)
        if input is not None:
            args["input-data"] = _b64(input)
        reply = self.execute("guest-exec", args)
        pid = reply.get("pid") if isinstance(reply, dict) else None
        if not isinstance(pid, int):
            raise QgaError(f"guest-exec returned no pid: {reply!r:.80}")
        return pid

    def exec_status(self, pid: int) -> ExecStatus:
        r = self.execute("guest-exec-status", {"pid": pid})
        if not isinstance(r, dict):
            raise QgaError(f"guest-exec-status returned {r!r:.80}")
        return ExecStatus(bool(r.get("exited")), r.get("exitcode"), r.get("signal"), _unb64(r.get("out-data")),
                          _unb64(r.get("err-data")), bool(r.get("out-truncated")), bool(r.get("err-truncated")))

    def wait_exec(self, pid: int, timeout: float | None = None, poll: float = 0.02) -> ExecStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.exec_status(pid)
            if st.exited:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise QgaTimeout(f"guest process {pid} still running after {timeout:g}s")
            time.sleep(poll)
            poll = min(poll * 1.5, 0.25)

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | Sequence[str] | None = None,
            input: bytes | None = None, timeout: float | None = None) -> ExecResult:
        """Run ``argv`` to completion and collect its output, like :func:`subprocess.run`."""
        pid = self.exec_start(argv, env=env, input=input)
        st = self.wait_exec(pid, timeout)
        code = st.exitcode if st.exitcode is not None else (-st.signal if st.signal else -1)
        return ExecResult(list(argv), code, st.stdout, st.stderr, st.signal)

    # -- files ---------------------------------------------------------------------------------
    def file_open(self, path: str, mode: str = "r") -> int:
        handle = self.execute("guest-file-open", {"path": path, "mode": mode})
        if not isinstance(handle, int):
            raise QgaError(f"guest-file-open returned {handle!r:.80}")
        return handle

    def file_read(self, handle: int, count: int = READ_CHUNK) -> tuple[bytes, bool]:
        r = self.execute("guest-file-read", {"handle": handle, "count": count})
        return _unb64(r.get("buf-b64")), bool(r.get("eof"))

    def file_write(self, handle: int, data: bytes) -> int:
        r = self.execute("guest-file-write", {"handle": handle, "buf-b64": _b64(data)})
        return int(r.get("count", 0))

    def file_seek(self, handle: int, offset: int, whence: int | str = "set") -> int:
        r = self.execute("guest-file-seek", {"handle": handle, "offset": offset, "whence": whence})
        return int(r.get("position", 0))

    def file_flush(self, handle: int) -> None:
        self.execute("guest-file-flush", {"handle": handle})

    def file_close(self, handle: int) -> None:
        self.execute("guest-file-close", {"handle": handle})

    def read_file(self, path: str) -> bytes:
        handle = self.file_open(path, "r")
        try:
            out = bytearray()
            while True:
                data, eof = self.file_read(handle, READ_CHUNK)
                out += data
                if eof or not data:
                    return bytes(out)
        finally:
            self.file_close(handle)

    def write_file(self, path: str, data: bytes, mode: str = "w") -> None:
        handle = self.file_open(path, mode)
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                n = self.file_write(handle, bytes(view[done:done + WRITE_CHUNK]))
                if n <= 0:
                    raise QgaError(f"guest-file-write to {path} wrote nothing")
                done += n
            self.file_flush(handle)
        finally:
            self.file_close(handle)
