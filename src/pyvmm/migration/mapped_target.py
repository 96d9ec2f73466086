"""Where a ``mapped-ram`` save writes: a descriptor it can ``pwrite`` at fixed offsets.

``file:PATH`` opens PATH (created, truncated).  Under ``-sandbox on`` the VMM may open no file
for writing, so, as with QEMU and libvirt, the file can come from the monitor client instead:

* ``file:/dev/fdset/N``: a writable member of the fd set ``add-fd`` made (QEMU's ``qemu_open``
  picks a member whose access mode fits and duplicates it);
* ``fd:NAME``: a descriptor passed with ``getfd``, which must be a regular file (QEMU lets
  ``fd:`` through with mapped-ram and fails on a socket or pipe; pyvmm refuses it at once).

The file is truncated to zero first: mapped-ram leaves zero chunks as holes, so old contents
must not show through.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import stat

from pyvmm.migration.uri import MigrationUri, fd_of

FDSET_PREFIX = "/dev/fdset/"


def check_seekable(fd: int) -> None:
    """Raise OSError unless ``fd`` is a regular file (pwrite at offsets, ftruncate)."""
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        kind = "a socket" if stat.S_ISSOCK(mode) else "a pipe" if stat.S_ISFIFO(mode) else "not a regular file"
        raise OSError(0, f"Mapped-ram migration requires a seekable file; the descriptor is {kind}")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise OSError(0, "Mapped-ram migration: the descriptor is open read-only")


def fdset_writable(path: str) -> int:
    """A duplicate of a writable member of fd set N for ``path`` = ``/dev/fdset/N`` (the caller owns it)."""
    text = path[len(FDSET_PREFIX):]
    if not text.isdigit():
        raise OSError(0, f"Could not parse fdset {text}")
    try:
        fdpass = importlib.import_module("pyvmm.monitor.fdpass")
    except ImportError:
        fdpass = None
    dup = getattr(fdpass, "fdset_dup", None)
    fd = dup(int(text), writable=True) if callable(dup) else None
    if not isinstance(fd, int):
        raise OSError(0, f"{path}: no writable descriptor in fd set {int(text)}")
    return fd


def open_target(uri: MigrationUri, fds: dict[str, int] | None) -> int:
    """The descriptor the save writes to, truncated; the caller closes it."""
    if uri.scheme == "file" and not uri.target.startswith(FDSET_PREFIX):
        return os.open(uri.target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    fd = (fds or {}).get(uri.target) if uri.scheme == "file" else fd_of(uri.target, fds)
    if fd is None:
        raise OSError(0, f"{uri.text}: no descriptor")
    try:
        check_seekable(fd)
        os.ftruncate(fd, 0)
    except OSError:
        os.close(fd)
        raise
    return fd
