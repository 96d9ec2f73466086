"""The interface every image back-end offers a block device, and :func:`open_image`.

Back-ends move data between the image and caller-supplied memoryviews (guest
RAM) with ``preadv``/``pwritev``; they never copy guest data into Python
objects on the read or write path.

Threading: a back-end is not thread-safe; its device calls it with the device
lock held (one request at a time).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Protocol

from pyvmm.block.iov import Iov
from pyvmm.errors import PyvmmError

if TYPE_CHECKING:
    from pyvmm.block.lock import Perm

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


#: Bytes of sector 0 that format probing reads (QEMU's BLOCK_PROBE_BUF_SIZE).
PROBE_BYTES = 512
#: How many backing files deep a chain may go before it is refused.
MAX_BACKING_DEPTH = 64


def probe_buffer(head: bytes) -> str | None:
    """The image format QEMU's probing would see in these first bytes, or None (raw).

    pyvmm itself serves only raw and qcow2, but a raw image must never start to look like any
    format QEMU (or another tool) would probe, so the common magics are all known here.
    """
    if head[:4] == b"QFI\xfb":
        return "qcow2" if int.from_bytes(head[4:8], "big") >= 2 else "qcow"
    magics = ((0, b"QED\0", "qed"), (0, b"KDMV", "vmdk"), (0, b"COWD", "vmdk"), (0, b"conectix", "vpc"),
              (0, b"vhdxfile", "vhdx"), (0, b"LUKS\xba\xbe", "luks"), (0, b"Bochs Virtual HD Image", "bochs"),
              (0, b"WithoutFreeSpace", "parallels"), (0, b"WithouFreSpacExt", "parallels"),
              (0x40, b"\x7f\x10\xda\xbe", "vdi"), (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"))
    for off, magic, name in magics:
        if head[off:off + len(magic)] == magic:
            return name
    if b"# Disk DescriptorFile" in head[:PROBE_BYTES]:  # a VMDK text descriptor
        return "vmdk"
    return None


def probe_format(path: str) -> str:
    """``qcow2`` if the file starts with the qcow2 magic, ``raw`` if it looks like no format;
    BlockError for another format pyvmm cannot open."""
    with open(path, "rb") as f:
        head = f.read(PROBE_BYTES)
    fmt = probe_buffer(head) or "raw"
    if fmt not in ("raw", "qcow2"):
        raise BlockError(f"{path}: the image probes as {fmt}, which pyvmm does not support (raw or qcow2)")
    return fmt


def check_image_file(path: str) -> None:
    """Refuse, with one line, what cannot be an image: a missing file, a directory, a FIFO..."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BlockError(f"{path}: no such file") from None
    except OSError as e:
        raise BlockError(f"{path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BlockError(f"{path}: is a directory, not an image file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BlockError(f"{path}: not a regular file or block device")


def open_image(path: str, fmt: str | None = "raw", read_only: bool = False, *, locking: str = "auto",
               share_rw: bool = False) -> BlockBackend:
    """Open ``path`` as ``fmt`` (``raw``, ``qcow2``, or None to probe) for a disk device, and lock
    it as QEMU would for a virtio-blk (:mod:`pyvmm.block.lock`).  Raises BlockError."""
    from pyvmm.block.lock import device_perms

    return open_image_perms(path, fmt, read_only, device_perms(read_only, share_rw), locking=locking)


def open_image_perms(path: str, fmt: str | None, read_only: bool, perms: tuple[Perm, Perm], *,
                     locking: str = "auto", chain: tuple[tuple[int, int], ...] = ()) -> BlockBackend:
    """:func:`open_image` with the permissions its user holds and shares given; ``chain`` is the
    (st_dev, st_ino) of the overlays above it, for loop detection."""
    check_image_file(path)
    probed = fmt is None
    if fmt is None:
        fmt = probe_format(path)
    if fmt == "raw":
        from pyvmm.block.raw import RawImage

        return RawImage(path, read_only=read_only, perms=perms, locking=locking, probed=probed)
    if fmt == "qcow2":
        from pyvmm.block.qcow2 import Qcow2Image

        return Qcow2Image(path, read_only=read_only, perms=perms, locking=locking, chain=chain)
    raise BlockError(f"{path}: unsupported image format {fmt!r} (raw or qcow2)")
