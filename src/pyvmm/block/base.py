"""The interface every image back-end offers a block device, and :func:`open_image`.

Back-ends move data between the image and caller-supplied memoryviews (guest
RAM) with ``preadv``/``pwritev``; they never copy guest data into Python
objects on the read or write path.

Threading: a back-end is not thread-safe; its device calls it with the device
lock held (one request at a time).
"""

from __future__ import annotations

import os
from typing import Protocol

from pyvmm.block.iov import Iov
from pyvmm.errors import PyvmmError

SECTOR_SIZE = 512


class BlockError(PyvmmError):
    """An image cannot be opened (format, features), or an I/O request on it failed."""


class BlockBackend(Protocol):
    """A disk image: a byte array of ``size`` bytes."""

    path: str
    size: int
    read_only: bool

    def readv(self, iov: Iov, offset: int) -> None:
        """Fill ``iov`` with image bytes from ``offset``.  Raises BlockError/OSError."""
        ...

    def writev(self, iov: Iov, offset: int) -> None:
        """Write ``iov`` to the image at ``offset``.  Raises BlockError/OSError."""
        ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None:
        """Advisory: the range is no longer needed (may read back as anything)."""
        ...

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read back as zeroes."""
        ...

    def close(self) -> None: ...


def probe_format(path: str) -> str:
    """``qcow2`` if the file starts with the qcow2 magic, else ``raw``."""
    from pyvmm.block.qcow2 import QCOW2_MAGIC

    with open(path, "rb") as f:
        head = f.read(4)
    return "qcow2" if head == QCOW2_MAGIC else "raw"


def open_image(path: str, fmt: str | None = "raw", read_only: bool = False) -> BlockBackend:
    """Open ``path`` as ``fmt`` (``raw``, ``qcow2``, or None to probe).  Raises BlockError."""
    if not os.path.exists(path):
        raise BlockError(f"{path}: no such file")
    if fmt is None:
        fmt = probe_format(path)
    if fmt == "raw":
        from pyvmm.block.raw import RawImage

        return RawImage(path, read_only=read_only)
    if fmt == "qcow2":
        from pyvmm.block.qcow2 import Qcow2Image

        return Qcow2Image(path, read_only=read_only)
    raise BlockError(f"{path}: unsupported image format {fmt!r} (raw or qcow2)")
