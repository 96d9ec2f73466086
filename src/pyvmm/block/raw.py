"""Raw image files: guest sector N is file byte N*512.

Reads and writes go straight between the file and guest memory with
``preadv``/``pwritev``.  Discard punches holes and write-zeroes uses
``FALLOC_FL_ZERO_RANGE`` where the file system supports them (falling back
to writing zero bytes), through libc's ``fallocate``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os

from pyvmm.block.base import PROBE_BYTES, BlockError, probe_buffer
from pyvmm.block.iov import (
    FileStats,
    Iov,
    iov_len,
    iov_slice,
    iov_to_bytes,
    preadv_full,
    pwritev_full,
    write_zeroes_fd,
)
from pyvmm.block.lock import ImageLock, Perm, device_perms, filter_perms

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


@functools.cache
def _libc_fallocate():
    # The process's own symbols (libc among them): find_library() would run ldconfig in a child
    # process, which -sandbox on forbids once the VM runs (the first discard comes late).
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """libc fallocate(2); False if the file system does not support ``mode``."""
    rc = _libc_fallocate()(fd, mode, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class RawImage:
    """A raw disk image file, locked as QEMU's file-posix driver locks it.

    ``probed``: the format was guessed, not given.  Then, as QEMU's raw driver does, a write
    that would make sector 0 look like another image format (a qcow2 header naming a host file
    as its backing file, say) is refused, and the guest cannot turn its disk into something the
    next probe would trust.
    """

    def __init__(self, path: str, read_only: bool = False, *, perms: tuple[Perm, Perm] | None = None,
                 locking: str = "auto", probed: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.probed = probed
        self.file_stats = FileStats()  # the host file's, as QEMU's file node reports them
        try:
            self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise BlockError(f"{path}: {e.strerror}") from None
        try:
            self.lock = ImageLock(self.fd, path, locking)
            self.lock.set_perm(*filter_perms(*(perms or device_perms(read_only, False))))
        except BaseException:
            self.close()
            raise
        self.size = os.lseek(self.fd, 0, os.SEEK_END)  # st_size is 0 for block devices
        if probed and not read_only:
            log.warning("Image format was not specified for '%s' and probing guessed raw. "
                        "Automatically detecting the format is dangerous for raw images, write operations "
                        "on block 0 will be restricted. Specify the 'raw' format explicitly to remove the "
                        "restrictions.", path)

    def readv(self, iov: Iov, offset: int) -> None:
        preadv_full(self.fd, iov, offset)

    def writev(self, iov: Iov, offset: int) -> None:
        if self.read_only:
            raise BlockError(f"{self.path}: image is read-only")
        if self.probed and offset < PROBE_BYTES:
            self._check_sector0(iov, offset)
        pwritev_full(self.fd, iov, offset)
        self.file_stats.written(offset + iov_len(iov))

    def _check_sector0(self, iov: Iov, offset: int) -> None:
        """Refuse a write after which sector 0 would probe as another format."""
        n = min(iov_len(iov), PROBE_BYTES - offset)
        head = bytearray(os.pread(self.fd, PROBE_BYTES, 0).ljust(PROBE_BYTES, b"\0"))
        head[offset:offset + n] = iov_to_bytes(iov_slice(iov, 0, n))
        fmt = probe_buffer(bytes(head))
        if fmt is not None:
            raise BlockError(f"{self.path}: write to sector 0 refused: the probed raw image would then probe "
                             f"as {fmt} (give format=raw to allow it)")

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise BlockError(f"{self.path}: image is read-only")
        if fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            self.file_stats.discarded(length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if self.read_only:
            raise BlockError(f"{self.path}: image is read-only")
        mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) if unmap else FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        if not fallocate(self.fd, mode, offset, length):
            write_zeroes_fd(self.fd, offset, length)
        self.file_stats.written(offset + length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
