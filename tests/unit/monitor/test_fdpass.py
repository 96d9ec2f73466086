"""fdpass's bounds: descriptors a client sends over the QMP socket cannot pile up in the VMM."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import pytest

from pyvmm.monitor import fdpass
from pyvmm.monitor.errors import QmpError


@dataclass
class _Session:
    label: str
    passed_fds: fdpass.PassedFds = field(default_factory=fdpass.PassedFds)
    negotiated: bool = True


@dataclass
class _Ctx:
    session: _Session


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_read_keeps_a_bounded_number_and_getfd_takes_the_first() -> None:
    a, b = socket.socketpair()
    sock = fdpass.FdSocket.adopt(a)
    try:
        r, w = os.pipe()
        many = [os.dup(r) for _ in range(fdpass.MAX_FDS_PER_READ + 4)]
        socket.send_fds(b, [b"x"], many)
        for fd in many:
            os.close(fd)
        assert sock.recv(16) == b"x"
        kept = list(sock.passed.fds)
        assert 0 < len(kept) <= fdpass.MAX_FDS_PER_READ
        ctx = _Ctx(_Session("t-bounds", sock.passed))
        fdpass._getfd(ctx, {"fdname": "one"})  # type: ignore[arg-type]
        assert sock.passed.fds == [] and not any(_open(fd) for fd in kept[1:])
        taken = fdpass.take_fd("one")
        assert taken == kept[0] and _open(taken)
        os.close(taken)
        assert fdpass.take_fd("one") is None
        os.close(r)
        os.close(w)
    finally:
        sock.close()
        b.close()


def test_named_fds_are_bounded_and_closed_with_the_monitor() -> None:
    session = _Session("t-limit")
    ctx = _Ctx(session)
    held = []
    for i in range(fdpass.MAX_NAMED_FDS):
        session.passed_fds.replace([os.open(os.devnull, os.O_RDONLY)])
        held.append(session.passed_fds.fds[0])
        fdpass._getfd(ctx, {"fdname": f"f{i}"})  # type: ignore[arg-type]
    extra = os.open(os.devnull, os.O_RDONLY)
    session.passed_fds.replace([extra])
    with pytest.raises(QmpError, match="Too many file descriptors"):
        fdpass._getfd(ctx, {"fdname": "one-more"})  # type: ignore[arg-type]
    assert not _open(extra) or extra in held  # closed (its number may be reused only by ours)
    fdpass.close_monitor("t-limit")
    assert not any(_open(fd) for fd in held)
