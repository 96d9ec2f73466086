"""Migration URIs, with QEMU's spellings: ``unix:PATH``, ``tcp:HOST:PORT``, ``exec:CMD`` and
``fd:NAME`` and ``file:PATH``, and the channels they open.

Outgoing channels are written to and closed (``exec:`` waits for its command and fails if
it exits non-zero); incoming channels are read from.  ``exec:`` runs ``/bin/sh -c CMD`` as
QEMU does: the outgoing command reads the stream on its standard input, the incoming one
writes it on its standard output.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
from dataclasses import dataclass

from pyvmm.errors import ConfigError

SCHEMES = ("unix", "tcp", "exec", "fd", "file")


@dataclass(frozen=True)
class MigrationUri:
    scheme: str
    target: str          # path, host, command or fd name
    port: int = 0

    @property
    def text(self) -> str:
        return f"{self.scheme}:{self.target}:{self.port}" if self.scheme == "tcp" else f"{self.scheme}:{self.target}"


def parse(uri: str) -> MigrationUri:
    """``uri`` checked; a ConfigError with QEMU's wording where QEMU has one."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in SCHEMES:
        raise ConfigError(f"unknown migration protocol: {uri}")
    if not rest:
        raise ConfigError(f"{scheme}: migration URI {uri!r} names no {'command' if scheme == 'exec' else 'address'}")
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"error parsing address '{rest}'")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        return MigrationUri("tcp", host, int(port))
    return MigrationUri(scheme, rest)


def fd_of(name: str, fds: dict[str, int] | None) -> int:
    """QEMU's ``fd:`` argument: a number is a descriptor the process inherited, anything else the
    name a monitor client gave a descriptor it passed (``getfd``)."""
    if name.isdigit():
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            raise OSError(0, f"fd:{name}: not an open file descriptor") from None
        return fd
    fd2 = (fds or {}).get(name)
    if fd2 is None:
        raise OSError(0, f"File descriptor named '{name}' has not been found")
    return fd2


class OutChannel:
    """Where the source writes the stream."""

    def __init__(self, uri: MigrationUri, fds: dict[str, int] | None = None) -> None:
        self.uri = uri
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._file = None
        if uri.scheme == "exec":
            self._proc = subprocess.Popen(["/bin/sh", "-c", uri.target], stdin=subprocess.PIPE)
            self._file = self._proc.stdin
        elif uri.scheme == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(uri.target)
            except OSError as e:
                s.close()
                raise OSError(e.errno, f"Failed to connect to '{uri.target}': {e.strerror}") from None
            self._sock = s
        elif uri.scheme == "tcp":
            try:
                self._sock = socket.create_connection((uri.target, uri.port), timeout=30)
            except OSError as e:
                raise OSError(e.errno, f"Failed to connect to '{uri.target}:{uri.port}': {e.strerror}") from None
            self._sock.settimeout(60)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif uri.scheme == "file":
            try:
                self._file = open(uri.target, "wb")  # noqa: SIM115 (closed by finish/abort)
            except OSError as e:
                raise OSError(e.errno, f"{uri.target}: {e.strerror}") from None
        else:
            fd = fd_of(uri.target, fds)
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                # a connected socket (libvirt's, or pyvmmd's for a sandboxed VM): ended as tcp:/unix: are,
                # by a shutdown and waiting for the destination to close, so finish() knows it read it all
                self._sock = socket.socket(fileno=fd)
                self._sock.settimeout(60)
            else:
                self._file = os.fdopen(fd, "wb", buffering=0)

    def write(self, data: bytes | memoryview) -> None:
        if self._sock is not None:
            self._sock.sendall(data)
        else:
            assert self._file is not None
            self._file.write(data)

    def finish(self) -> None:
        """Flush and close; raises OSError if the other end did not take the whole stream."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
            # wait for the destination to close: it has read everything (or died)
            self._sock.settimeout(30)
            with contextlib.suppress(OSError):
                while self._sock.recv(4096):
                    pass
            self._sock.close()
            self._sock = None
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._proc is not None:
            rc = self._proc.wait()
            self._proc = None
            if rc != 0:
                raise OSError(0, f"the migration command exited with status {rc}")

    def abort(self) -> None:
        """Drop the channel (cancel or failure): the destination sees the stream end early."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None


class InChannel:
    """Where the destination reads the stream (``unix:``/``tcp:`` accept one connection)."""

    def __init__(self, uri: MigrationUri, fds: dict[str, int] | None = None) -> None:
        self.uri = uri
        self._proc: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._file = None
        if uri.scheme == "exec":
            self._proc = subprocess.Popen(["/bin/sh", "-c", uri.target], stdout=subprocess.PIPE)
            self._file = self._proc.stdout
        elif uri.scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(uri.target) and not os.path.isdir(uri.target):
                    os.unlink(uri.target)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(uri.target)
            s.listen(1)
            self._listener = s
        elif uri.scheme == "tcp":
            family = socket.AF_INET6 if ":" in uri.target else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((uri.target or "0.0.0.0", uri.port))
            s.listen(1)
            self._listener = s
        elif uri.scheme == "file":
            try:
                self._file = open(uri.target, "rb")  # noqa: SIM115 (closed by close)
            except OSError as e:
                raise OSError(e.errno, f"{uri.target}: {e.strerror}") from None
        else:
            self._file = os.fdopen(fd_of(uri.target, fds), "rb")

    def accept(self) -> None:
        if self._listener is not None and self._conn is None:
            conn, _ = self._listener.accept()
            self._listener.close()
            self._listener = None
            self._conn = conn

    def read(self, n: int) -> bytes:
        if self._conn is not None:
            return self._conn.recv(min(n, 1 << 20))
        assert self._file is not None
        return self._file.read(n)

    def close(self) -> None:
        for s in (self._conn, self._listener):
            if s is not None:
                s.close()
        self._conn = self._listener = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None
