"""Image locking that QEMU's file-posix driver and pyvmm both understand.

The protocol (QEMU's, so that pyvmm and QEMU see each other): every permission bit N a user
*holds* on an image is a shared (read) lock on file byte 100+N; every permission N it does *not
share* with others is a shared lock on byte 200+N.  Taking permission N means first locking our
own bytes, then testing that no other open file description locks byte 200+N (someone refuses to
share N); refusing to share N means testing that nobody locks byte 100+N (someone holds N).
Locking before testing means two racing openers may both fail, never both succeed.

Locks are open-file-description locks (``F_OFD_SETLK``): they belong to the file descriptor,
so two opens of one image in one process conflict as two processes do, and closing the fd
drops them.  ``locking=off`` takes none; ``auto`` (the default) takes them where the kernel has
OFD locks; ``on`` falls back to process-wide POSIX locks there, with QEMU's warning.

Which permissions a virtio-blk device asks for, per format, mirrors QEMU 7.2's defaults
(``blkconf_apply_backend_options`` for the device, ``bdrv_default_perms`` for the format layer),
checked against QEMU's own locks in /proc/locks by tests/system/test_image_locking_qemu.py.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import struct
from enum import IntFlag

from pyvmm.block.base import BlockError

log = logging.getLogger(__name__)

PERM_BASE = 100
SHARED_BASE = 200
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on Linux x86-64: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t)
_FLOCK = struct.Struct("hhxxxxqqi4x")
LOCKING_MODES = ("auto", "on", "off")


class Perm(IntFlag):
    """QEMU's block permissions (BLK_PERM_*): bit N is lock byte 100+N / 200+N."""

    CONSISTENT_READ = 1
    WRITE = 2
    WRITE_UNCHANGED = 4
    RESIZE = 8
    GRAPH_MOD = 16


PERM_ALL = Perm(31)
PERM_NAMES = {Perm.CONSISTENT_READ: "consistent read", Perm.WRITE: "write",
              Perm.WRITE_UNCHANGED: "write unchanged", Perm.RESIZE: "resize", Perm.GRAPH_MOD: "change children"}
_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE


def device_perms(read_only: bool, share_rw: bool) -> tuple[Perm, Perm]:
    """(held, shared) of a virtio-blk device: it reads, writes unless read-only, and lets others
    read, resize and write-unchanged; others may write only with ``share-rw=on``."""
    perm = Perm.CONSISTENT_READ | (Perm(0) if read_only else Perm.WRITE)
    shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.GRAPH_MOD | Perm.RESIZE
    if share_rw:
        shared |= Perm.WRITE
    return perm, shared


def filter_perms(perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    """What a raw image (a pass-through format) asks of its file."""
    return perm & _PASSTHROUGH, (shared & _PASSTHROUGH) | (PERM_ALL & ~_PASSTHROUGH)


def metadata_perms(perm: Perm, shared: Perm, writable: bool) -> tuple[Perm, Perm]:
    """What a qcow2 image asks of its file: it may write metadata whenever it is writable, and
    never lets anyone else write or resize the file under it (share-rw=on does not change that)."""
    perm, shared = filter_perms(perm, shared)
    if writable:
        perm |= Perm.WRITE | Perm.RESIZE
    perm |= Perm.CONSISTENT_READ
    shared &= ~(Perm.WRITE | Perm.RESIZE)
    return perm, shared


def backing_perms(perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    """What an overlay asks of its backing image: consistent reads only; it lets others write
    (and resize) the backing file only if its own users let others write."""
    perm &= Perm.CONSISTENT_READ
    new_shared = (Perm.WRITE | Perm.RESIZE) if shared & Perm.WRITE else Perm(0)
    return perm, new_shared | Perm.CONSISTENT_READ | Perm.GRAPH_MOD | Perm.WRITE_UNCHANGED


@functools.cache
def have_ofd_locks() -> bool:
    """True if the kernel has OFD locks (it answers F_OFD_GETLK)."""
    fd = os.open("/", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.fcntl(fd, F_OFD_GETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class ImageLock:
    """The lock bytes one open image file holds (see the module docstring)."""

    def __init__(self, fd: int, path: str, mode: str = "auto") -> None:
        if mode not in LOCKING_MODES:
            raise BlockError(f"{path}: locking={mode}: invalid parameter value (on, off or auto)")
        self.fd = fd
        self.path = path
        self.enabled = mode == "on" or (mode == "auto" and have_ofd_locks())
        self.ofd = have_ofd_locks()
        if mode == "on" and not self.ofd:
            log.warning("File lock requested but OFD locking syscall is unavailable, "
                        "falling back to POSIX file locks (locks can be lost unexpectedly)")
        self.perm = Perm(0)
        self.shared = PERM_ALL
        self._locked: set[int] = set()

    # -- one byte ------------------------------------------------------------------------------
    def _fcntl(self, cmd_ofd: int, cmd_posix: int, ltype: int, byte: int) -> bytes:
        arg = _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0)
        return fcntl.fcntl(self.fd, cmd_ofd if self.ofd else cmd_posix, arg)

    def _lock(self, byte: int) -> None:
        self._fcntl(F_OFD_SETLK, fcntl.F_SETLK, fcntl.F_RDLCK, byte)
        self._locked.add(byte)

    def _unlock(self, byte: int) -> None:
        self._fcntl(F_OFD_SETLK, fcntl.F_SETLK, fcntl.F_UNLCK, byte)
        self._locked.discard(byte)

    def _held_elsewhere(self, byte: int) -> bool:
        """Does another open file description lock ``byte``?  (Our own locks never conflict.)"""
        out = self._fcntl(F_OFD_GETLK, fcntl.F_GETLK, fcntl.F_WRLCK, byte)
        return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK

    def _apply(self, perm: Perm, unshared: Perm, unlock: bool) -> None:
        for base, bits in ((PERM_BASE, perm), (SHARED_BASE, unshared)):
            for p in PERM_NAMES:
                byte = base + p.bit_length() - 1
                if bits & p and byte not in self._locked:
                    self._lock(byte)
                elif unlock and not bits & p and byte in self._locked:
                    self._unlock(byte)

    # -- what back-ends call ---------------------------------------------------------------------
    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Hold ``perm`` and share only ``shared``, or raise BlockError (and keep what was held)."""
        if not self.enabled:
            self.perm, self.shared = perm, shared
            return
        try:
            self._apply(self.perm | perm, ~self.shared & PERM_ALL | ~shared & PERM_ALL, unlock=False)
            for p in PERM_NAMES:
                if perm & p and self._held_elsewhere(SHARED_BASE + p.bit_length() - 1):
                    raise self._conflict(f'Failed to get "{PERM_NAMES[p]}" lock')
            for p in PERM_NAMES:
                if not shared & p and self._held_elsewhere(PERM_BASE + p.bit_length() - 1):
                    raise self._conflict(f'Failed to get shared "{PERM_NAMES[p]}" lock')
        except BlockError:
            self._restore()
            raise
        except OSError as e:
            self._restore()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise self._conflict("Failed to lock the image") from None
            raise BlockError(f"{self.path}: cannot lock the image: {e.strerror}") from None
        self._apply(perm, ~shared & PERM_ALL, unlock=True)
        self.perm, self.shared = perm, shared

    def _restore(self) -> None:
        try:
            self._apply(self.perm, ~self.shared & PERM_ALL, unlock=True)
        except OSError as e:  # only unlocking: should not fail
            log.warning("%s: unlocking failed: %s", self.path, e.strerror)

    def _conflict(self, what: str) -> BlockError:
        return BlockError(f"{what}: Is another process using the image [{self.path}]?")

    def locked_bytes(self) -> list[int]:
        return sorted(self._locked)
