"""I/O accounting, as QEMU's BlockAcctStats: what ``query-blockstats`` reports for a device's disk.

:class:`AccountedImage` wraps the image a device uses (it is itself a
:class:`~pyvmm.block.base.BlockBackend`): each read, write, flush and discard is counted with its
bytes and time, failures apart, as QEMU counts them in its BlockBackend.  It also applies the node
options that act per request: ``discard=ignore`` drops guest discards (and the unmap hint of
write-zeroes) and ``cache.no-flush=on`` makes a flush do nothing.

Threading: the device calls it with its lock held; the monitor reads the counters from its own
thread (plain integer reads: a report may be one request behind, never torn).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvmm.block.base import BlockBackend
from pyvmm.block.iov import Iov, iov_len


@dataclass
class IoStats:
    rd_bytes: int = 0
    wr_bytes: int = 0
    unmap_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    unmap_operations: int = 0
    failed_rd_operations: int = 0
    failed_wr_operations: int = 0
    failed_flush_operations: int = 0
    failed_unmap_operations: int = 0
    rd_total_time_ns: int = 0
    wr_total_time_ns: int = 0
    flush_total_time_ns: int = 0
    unmap_total_time_ns: int = 0
    wr_highest_offset: int = 0
    last_io_ns: int | None = None
    accounted: bool = field(default=True)

    def to_json(self) -> dict[str, Any]:
        """QEMU's BlockDeviceStats (invalid and merged requests: pyvmm's devices count none)."""
        out: dict[str, Any] = {
            "rd_bytes": self.rd_bytes, "wr_bytes": self.wr_bytes, "unmap_bytes": self.unmap_bytes,
            "rd_operations": self.rd_operations, "wr_operations": self.wr_operations,
            "flush_operations": self.flush_operations, "unmap_operations": self.unmap_operations,
            "rd_total_time_ns": self.rd_total_time_ns, "wr_total_time_ns": self.wr_total_time_ns,
            "flush_total_time_ns": self.flush_total_time_ns, "unmap_total_time_ns": self.unmap_total_time_ns,
            "wr_highest_offset": self.wr_highest_offset,
            "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
            "failed_rd_operations": self.failed_rd_operations, "failed_wr_operations": self.failed_wr_operations,
            "failed_flush_operations": self.failed_flush_operations,
            "failed_unmap_operations": self.failed_unmap_operations,
            "invalid_rd_operations": 0, "invalid_wr_operations": 0, "invalid_flush_operations": 0,
            "invalid_unmap_operations": 0,
            "account_invalid": self.accounted, "account_failed": self.accounted, "timed_stats": [],
        }
        if self.last_io_ns is not None:
            out["idle_time_ns"] = time.monotonic_ns() - self.last_io_ns
        return out


class AccountedImage:
    """A device's view of its image: counted, with the node's discard and flush options applied."""

    def __init__(self, image: BlockBackend, *, discard: bool = True, no_flush: bool = False) -> None:
        self.image = image
        self.path = image.path
        self.size = image.size
        self.read_only = image.read_only
        self.discard_enabled = discard
        self.no_flush = no_flush
        self.stats = IoStats()

    def _account(self, kind: str, nbytes: int, fn: Callable[[], None]) -> None:
        s = self.stats
        start = time.monotonic_ns()
        try:
            fn()
        except BaseException:
            setattr(s, f"failed_{kind}_operations", getattr(s, f"failed_{kind}_operations") + 1)
            s.last_io_ns = time.monotonic_ns()
            raise
        end = time.monotonic_ns()
        setattr(s, f"{kind}_operations", getattr(s, f"{kind}_operations") + 1)
        setattr(s, f"{kind}_total_time_ns", getattr(s, f"{kind}_total_time_ns") + end - start)
        if kind != "flush":
            setattr(s, f"{kind}_bytes", getattr(s, f"{kind}_bytes") + nbytes)
        s.last_io_ns = end

    # reads and writes, the hot path, are counted inline
    def readv(self, iov: Iov, offset: int) -> None:
        s = self.stats
        start = time.monotonic_ns()
        try:
            self.image.readv(iov, offset)
        except BaseException:
            s.failed_rd_operations += 1
            s.last_io_ns = time.monotonic_ns()
            raise
        s.last_io_ns = end = time.monotonic_ns()
        s.rd_operations += 1
        s.rd_bytes += iov_len(iov)
        s.rd_total_time_ns += end - start

    def writev(self, iov: Iov, offset: int) -> None:
        s = self.stats
        start = time.monotonic_ns()
        try:
            self.image.writev(iov, offset)
        except BaseException:
            s.failed_wr_operations += 1
            s.last_io_ns = time.monotonic_ns()
            raise
        s.last_io_ns = end = time.monotonic_ns()
        n = iov_len(iov)
        s.wr_operations += 1
        s.wr_bytes += n
        s.wr_total_time_ns += end - start
        if offset + n > s.wr_highest_offset:
            s.wr_highest_offset = offset + n

    def flush(self) -> None:
        self._account("flush", 0, (lambda: None) if self.no_flush else self.image.flush)

    def discard(self, offset: int, length: int) -> None:
        self._account("unmap", length, (lambda: self.image.discard(offset, length)) if self.discard_enabled
                      else (lambda: None))

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        # QEMU counts write-zeroes as writes of their length
        self._account("wr", length, lambda: self.image.write_zeroes(offset, length, unmap and self.discard_enabled))
        self.stats.wr_highest_offset = max(self.stats.wr_highest_offset, offset + length)

    def close(self) -> None:
        self.image.close()
