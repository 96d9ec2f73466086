"""Where a mapped-ram save may write (migration/mapped_target.py): a regular file opened for writing,
by path, by fd set (``file:/dev/fdset/N``) or by name (``fd:NAME``); sockets, pipes and read-only
descriptors are refused before a migration starts, and the descriptor is released either way."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pyvmm.migration import mapped_target
from pyvmm.migration.manager import MigrationError, MigrationManager
from pyvmm.migration.uri import MigrationUri
from pyvmm.monitor import fdpass


class _Source:
    memory = None

    def check_savable(self) -> None: ...


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_check_seekable(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    f = tmp_path / "f"
    f.write_bytes(b"x")
    ro = os.open(f, os.O_RDONLY)
    rw = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError, match="seekable file; the descriptor is a socket"):
            mapped_target.check_seekable(a.fileno())
        with pytest.raises(OSError, match="is a pipe"):
            mapped_target.check_seekable(w)
        with pytest.raises(OSError, match="read-only"):
            mapped_target.check_seekable(ro)
        mapped_target.check_seekable(rw)
    finally:
        a.close()
        b.close()
        for fd in (r, w, ro, rw):
            os.close(fd)


def test_open_target_truncates_a_passed_file(tmp_path: Path) -> None:
    f = tmp_path / "state"
    f.write_bytes(b"old" * 1000)
    fd = os.open(f, os.O_WRONLY)
    got = mapped_target.open_target(MigrationUri("fd", "st"), {"st": fd})
    assert got == fd and f.stat().st_size == 0
    os.close(got)
    path = mapped_target.open_target(MigrationUri("file", str(tmp_path / "new")), None)
    os.close(path)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600


def test_fdset_member_must_be_writable(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    ro, wo = os.open(f, os.O_RDONLY), os.open(f, os.O_WRONLY)
    with fdpass._lock:
        fdpass._fdsets[77] = [(ro, None)]
        fdpass._fdsets[78] = [(ro, None), (wo, "w")]
    try:
        with pytest.raises(OSError, match="no writable descriptor in fd set 77"):
            mapped_target.fdset_writable("/dev/fdset/77")
        with pytest.raises(OSError, match="Could not parse fdset x"):
            mapped_target.fdset_writable("/dev/fdset/x")
        dup = mapped_target.fdset_writable("/dev/fdset/78")
        assert dup not in (ro, wo) and os.path.samestat(os.fstat(dup), os.fstat(wo))
        os.close(dup)
    finally:
        with fdpass._lock:
            del fdpass._fdsets[77], fdpass._fdsets[78]
        os.close(ro)
        os.close(wo)


def test_mapped_ram_refuses_a_socket_and_closes_it() -> None:
    m = MigrationManager(_Source(), incoming=None)  # type: ignore[arg-type]
    m.set_capabilities([{"capability": "mapped-ram", "state": True}])
    a, b = socket.socketpair()
    fd = a.detach()
    m.fds["sock"] = fd
    try:
        with pytest.raises(MigrationError, match="requires a seekable file"):
            m.migrate("fd:sock", inmigrate=False)
        assert _closed(fd) and "sock" not in m.fds
        with pytest.raises(MigrationError, match="requires a file: URI"):
            m.migrate("exec:cat", inmigrate=False)
        with pytest.raises(MigrationError, match="no writable descriptor"):
            m.migrate("file:/dev/fdset/12345", inmigrate=False)
    finally:
        b.close()
