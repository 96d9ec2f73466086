"""Descriptors the daemon opens for a VM process's migration stream and passes over QMP.

A VM process under the seccomp sandbox may open no file for writing and make no socket, so
for a snapshot the daemon creates the state file and for a migration it connects to the
destination itself, then hands the descriptor over as libvirt does: ``SCM_RIGHTS`` on the QMP
socket (qemu.qmp's ``send_fd_scm``), QMP ``getfd`` to name it, and ``migrate fd:NAME``
(mapped-ram writes a regular file passed so with ``pwrite``: migration/mapped_target.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

from qemu.qmp import ExecuteError, QMPError

from pyvmm.manager.supervisor import ManagerError, Supervisor, VmHandle


def create_state_file(path: Path, owner: tuple[int, int, list[int]] | None) -> int:
    """A new file for a VM's state, opened for writing; it belongs to the VM user if there is one
    (as when the VM process created it), so a restore under that user can read it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ManagerError(409, f"cannot create {path}: {e.strerror}") from None
    if owner is not None:
        try:
            os.fchown(fd, owner[0], owner[1])
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise ManagerError(409, f"cannot give {path} to the VM user: {e.strerror}") from None
    return fd


async def connect(host: str, port: int, timeout: float = 30.0) -> socket.socket:
    """A blocking TCP connection to the destination VM process's ``-incoming`` listener."""
    def dial() -> socket.socket:
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(None)
        return s

    try:
        return await asyncio.to_thread(dial)
    except OSError as e:
        raise ManagerError(409, f"cannot connect to the destination {host}:{port}: {e.strerror or e}") from None


async def has_getfd(sup: Supervisor, h: VmHandle) -> bool:
    """Whether the VM process takes descriptors (QMP ``getfd``; an older pyvmm has none)."""
    commands = await sup._qmp(h, "query-commands")
    return any(isinstance(c, dict) and c.get("name") == "getfd" for c in commands or [])


async def pass_fd(sup: Supervisor, h: VmHandle, fd: int, name: str) -> None:
    """Give ``fd`` to the VM process as ``name`` (``getfd``); the caller still closes its own copy."""
    if h.qmp is None:
        raise ManagerError(409, f"VM {h.name}: no QMP connection to its process")
    try:
        h.qmp.send_fd_scm(fd)
        await asyncio.wait_for(h.qmp.execute("getfd", {"fdname": name}), 5.0)
    except ExecuteError as e:
        raise ManagerError(409, f"VM {h.name}: QMP getfd failed: {e.error.error.desc}") from None
    except (OSError, TimeoutError, QMPError) as e:
        raise ManagerError(409, f"VM {h.name}: cannot pass a descriptor over QMP: {e}") from None


async def drop_fd(sup: Supervisor, h: VmHandle, name: str) -> None:
    """``closefd`` a passed descriptor the migration did not take (it failed to start)."""
    with contextlib.suppress(ManagerError):
        await sup._qmp(h, "closefd", {"fdname": name})
