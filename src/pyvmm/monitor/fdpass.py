"""File descriptors passed over the monitor socket: ``getfd``, ``closefd``, ``add-fd``, ``remove-fd``.

A client sends a descriptor as ``SCM_RIGHTS`` ancillary data together with the bytes of the
command that names it (QEMU's ``qemu_chr_fe_get_msgfd``).  The monitor's reader keeps the
descriptors of its latest read in the session's :class:`PassedFds` (:class:`FdSocket` does the
``recvmsg``); ``getfd`` takes the first of them and files it under a name, per monitor, as
QEMU's ``mon->fds``.  ``migrate fd:NAME`` takes it from there with :func:`take_fd`.  ``add-fd``
files a copy in a numbered fd set instead (QEMU's fdsets, global).

Bounds: one read keeps at most :data:`MAX_FDS_PER_READ` descriptors (the rest are closed as they
arrive), a monitor holds at most :data:`MAX_NAMED_FDS` named ones and the fd sets at most
:data:`MAX_FDSET_FDS`, so a client cannot exhaust the VMM's descriptor table.
"""
from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvmm.monitor.errors import QmpError

if TYPE_CHECKING:
    from pyvmm.monitor.commands import Command, CommandContext

log = logging.getLogger(__name__)

#: Descriptors kept from one read (QEMU keeps those of the latest message too).
MAX_FDS_PER_READ = 16
#: Named descriptors one monitor may hold (``getfd``).
MAX_NAMED_FDS = 64
#: Descriptors all fd sets together may hold (``add-fd``).
MAX_FDSET_FDS = 256

_lock = threading.Lock()
#: monitor label -> name -> descriptor
_named: dict[str, dict[str, int]] = {}
#: fdset id -> [(descriptor, opaque)]
_fdsets: dict[int, list[tuple[int, str | None]]] = {}


@dataclass
class PassedFds:
    """The descriptors that came with a session's latest read; those not taken are closed on
    the next read that carries descriptors, or when the session ends."""

    fds: list[int] = field(default_factory=list)

    def replace(self, fds: list[int]) -> None:
        self.close()
        self.fds = fds[:MAX_FDS_PER_READ]
        for fd in fds[MAX_FDS_PER_READ:]:
            _close(fd)

    def take(self) -> int:
        """The first descriptor of the latest read (the others are dropped), or -1."""
        if not self.fds:
            return -1
        fd, rest = self.fds[0], self.fds[1:]
        self.fds = []
        for extra in rest:
            _close(extra)
        return fd

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            _close(fd)


class FdSocket(socket.socket):
    """A connected unix stream socket whose ``recv`` also collects ``SCM_RIGHTS`` descriptors
    into :attr:`passed` (asyncio's transport reads through ``recv``)."""

    passed: PassedFds

    @classmethod
    def adopt(cls, sock: socket.socket) -> FdSocket:
        new = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        new.passed = PassedFds()
        return new

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        space = socket.CMSG_SPACE(MAX_FDS_PER_READ * array.array("i").itemsize)
        data, ancdata, msg_flags, _ = self.recvmsg(bufsize, space, flags | socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if msg_flags & socket.MSG_CTRUNC:
            log.warning("qmp: a client passed more than %d descriptors at once; the rest were dropped",
                        MAX_FDS_PER_READ)
        if fds:
            self.passed.replace(fds)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        data = self.recv(nbytes or len(buffer), flags)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.passed.close()
        super().close()


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _passed(ctx: CommandContext) -> PassedFds | None:
    passed = getattr(ctx.session, "passed_fds", None)
    return passed if isinstance(passed, PassedFds) else None


def _take_passed(ctx: CommandContext) -> int:
    passed = _passed(ctx)
    fd = passed.take() if passed is not None else -1
    if fd < 0:
        raise QmpError("No file descriptor supplied via SCM_RIGHTS")
    return fd


def _label(ctx: CommandContext) -> str:
    return str(getattr(ctx.session, "label", "monitor"))


# -- getfd / closefd ---------------------------------------------------------------------------

def _getfd(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    name = args["fdname"]
    fd = _take_passed(ctx)
    if name[:1].isdigit():
        _close(fd)
        raise QmpError("Parameter 'fdname' expects a name not starting with a digit")
    with _lock:
        fds = _named.setdefault(_label(ctx), {})
        if name not in fds and len(fds) >= MAX_NAMED_FDS:
            _close(fd)
            raise QmpError(f"Too many file descriptors passed to this monitor (at most {MAX_NAMED_FDS})")
        old = fds.get(name)
        fds[name] = fd
    if old is not None:
        _close(old)
    log.debug("qmp: getfd %s = %d", name, fd)
    return {}


def _closefd(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    name = args["fdname"]
    with _lock:
        fd = _named.get(_label(ctx), {}).pop(name, None)
    if fd is None:
        raise QmpError(f"File descriptor named '{name}' not found")
    _close(fd)
    return {}


def take_fd(name: str) -> int | None:
    """Hand the descriptor ``getfd`` filed as ``name`` (on any monitor) to the caller, who owns it now."""
    with _lock:
        for fds in _named.values():
            if name in fds:
                return fds.pop(name)
    return None


def close_monitor(label: str) -> None:
    """The monitor ``label`` is going away: close the descriptors it holds."""
    with _lock:
        fds = _named.pop(label, {})
    for fd in fds.values():
        _close(fd)


# -- fd sets -----------------------------------------------------------------------------------

def _add_fd(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    fd = _take_passed(ctx)
    try:
        with _lock:
            if sum(len(v) for v in _fdsets.values()) >= MAX_FDSET_FDS:
                raise QmpError(f"Too many file descriptors in fd sets (at most {MAX_FDSET_FDS})")
            if "fdset-id" in args:
                set_id = args["fdset-id"]
                if set_id < 0:
                    raise QmpError("Parameter 'fdset-id' expects a non-negative value")
            else:
                set_id = next(i for i in range(len(_fdsets) + 1) if i not in _fdsets)
            copy = os.dup(fd)  # QEMU files a duplicate; the passed one is closed
            _fdsets.setdefault(set_id, []).append((copy, args.get("opaque")))
    finally:
        _close(fd)
    return {"fdset-id": set_id, "fd": copy}


def _remove_fd(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    set_id, fd = args["fdset-id"], args.get("fd")
    with _lock:
        members = _fdsets.get(set_id, [])
        gone = [m for m in members if fd is None or m[0] == fd]
        if gone:
            kept = [m for m in members if m not in gone]
            if kept:
                _fdsets[set_id] = kept
            else:
                del _fdsets[set_id]
    if not gone:
        where = f"fdset-id:{set_id}" if fd is None else f"fdset-id:{set_id}, fd:{fd}"
        raise QmpError(f"File descriptor named '{where}' not found")
    for member, _ in gone:
        _close(member)
    return {}


def fdset_dup(set_id: int, writable: bool) -> int | None:
    """A duplicate of a member of fd set ``set_id`` opened for writing (``writable``) or reading, for
    ``file:/dev/fdset/N`` (QEMU's ``monitor_fdset_dup_fd_add``); the caller owns it.  None if none fits."""
    import fcntl

    with _lock:
        for fd, _opaque in _fdsets.get(set_id, []):
            try:
                mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            except OSError:
                continue
            if (mode != os.O_RDONLY) if writable else (mode != os.O_WRONLY):
                return os.dup(fd)
    return None


def _query_fdsets(ctx: CommandContext, args: Mapping[str, Any]) -> list:
    with _lock:
        return [{"fdset-id": set_id,
                 "fds": [{"fd": fd, **({} if opaque is None else {"opaque": opaque})} for fd, opaque in members]}
                for set_id, members in sorted(_fdsets.items())]


def commands() -> list[Command]:
    from pyvmm.monitor.commands import Command, Param
    from pyvmm.monitor.schema import Member, ObjectType, register_type

    register_type(ObjectType("AddfdInfo", (Member("fdset-id", "int"), Member("fd", "int"))))
    register_type(ObjectType("FdsetFdInfo", (Member("fd", "int"), Member("opaque", "str", optional=True))))
    register_type(ObjectType("FdsetInfo", (Member("fdset-id", "int"), Member("fds", "[FdsetFdInfo]"))))
    return [
        Command("getfd", _getfd, (Param("fdname", "string", required=True),)),
        Command("closefd", _closefd, (Param("fdname", "string", required=True),)),
        Command("add-fd", _add_fd, (Param("fdset-id", "int"), Param("opaque", "string")),
                returns="AddfdInfo"),
        Command("remove-fd", _remove_fd, (Param("fdset-id", "int", required=True), Param("fd", "int"))),
        Command("query-fdsets", _query_fdsets, returns="[FdsetInfo]"),
    ]
