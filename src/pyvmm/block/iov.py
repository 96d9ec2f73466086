"""Scatter-gather lists of memoryviews (guest buffers) and full-length preadv/pwritev.

Guest buffers arrive as lists of zero-copy :class:`memoryview` objects over
guest RAM.  These helpers slice such lists without copying and loop on short
reads and writes, so the block back-ends move data between the image file
and guest memory with no intermediate buffer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

#: Linux's UIO_MAXIOV: at most this many buffers per preadv/pwritev call.
IOV_MAX = 1024
_ZEROS = bytes(1 << 16)

Iov = list[memoryview]


def iov_len(iov: Iov) -> int:
    return sum(len(v) for v in iov)


def iov_slice(iov: Iov, offset: int, length: int) -> Iov:
    """The views covering bytes ``[offset, offset+length)`` of ``iov`` (no copy)."""
    out: Iov = []
    for v in iov:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, length)
        if take <= 0:
            break
        out.append(v[offset:offset + take])
        length -= take
        offset = 0
        if length == 0:
            break
    return out


def iov_zero(iov: Iov) -> None:
    """Fill every buffer with zeroes."""
    for v in iov:
        for off in range(0, len(v), len(_ZEROS)):
            n = min(len(_ZEROS), len(v) - off)
            v[off:off + n] = _ZEROS[:n]


def iov_to_bytes(iov: Iov) -> bytes:
    return b"".join(bytes(v) for v in iov)


def iov_from_bytes(iov: Iov, data: bytes) -> int:
    """Copy ``data`` into the buffers; returns how many bytes fit."""
    done = 0
    for v in iov:
        if done >= len(data):
            break
        n = min(len(v), len(data) - done)
        v[:n] = data[done:done + n]
        done += n
    return done


def iov_pieces(iov: Iov, max_bytes: int) -> Iterator[memoryview]:
    """The bytes of ``iov`` as views of at most ``max_bytes`` each, in order (no copy)."""
    for v in iov:
        for off in range(0, len(v), max_bytes):
            yield v[off:off + max_bytes]


def readv_bounded(fd: int, iov: Iov) -> int:
    """``readv`` into all buffers, at most :data:`IOV_MAX` per call; stops at a short read.

    Returns the bytes read.  For devices and pipes (no offset), e.g. ``/dev/urandom``.
    """
    total = iov_len(iov)
    done = 0
    while done < total:
        part = iov_slice(iov, done, total - done)[:IOV_MAX]
        want = iov_len(part)
        try:
            n = os.readv(fd, part)
        except InterruptedError:
            continue
        done += n
        if n < want:
            break
    return done


def preadv_full(fd: int, iov: Iov, offset: int) -> int:
    """Read into all buffers from ``offset``; bytes past end of file are zero-filled.

    Returns the number of bytes that came from the file.
    """
    total = iov_len(iov)
    done = 0
    while done < total:
        part = iov_slice(iov, done, total - done)[:IOV_MAX]
        try:
            n = os.preadv(fd, part, offset + done)
        except InterruptedError:
            continue
        if n == 0:
            iov_zero(iov_slice(iov, done, total - done))
            break
        done += n
    return done


def pwritev_full(fd: int, iov: Iov, offset: int) -> int:
    """Write all buffers at ``offset``, retrying short writes.  Raises OSError on failure."""
    total = iov_len(iov)
    done = 0
    while done < total:
        part = iov_slice(iov, done, total - done)[:IOV_MAX]
        try:
            n = os.pwritev(fd, part, offset + done)
        except InterruptedError:
            continue
        if n <= 0:
            raise OSError(f"short write at offset {offset + done}")
        done += n
    return done


def write_zeroes_fd(fd: int, offset: int, length: int) -> None:
    """Write explicit zero bytes (fallback when fallocate cannot zero a range)."""
    end = offset + length
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        os.pwrite(fd, _ZEROS[:n], offset)
        offset += n


class FileStats:
    """What QEMU's file-posix node counts of its host file: the highest byte written (every
    write, metadata too) and the discards that freed space (``discard-nb-ok``, ``-bytes-ok``)."""

    __slots__ = ("wr_highest_offset", "discard_nb_ok", "discard_bytes_ok")

    def __init__(self) -> None:
        self.wr_highest_offset = 0
        self.discard_nb_ok = 0
        self.discard_bytes_ok = 0

    def written(self, end: int) -> None:
        if end > self.wr_highest_offset:
            self.wr_highest_offset = end

    def discarded(self, length: int) -> None:
        self.discard_nb_ok += 1
        self.discard_bytes_ok += length
