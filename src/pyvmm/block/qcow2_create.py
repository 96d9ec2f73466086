"""Creating an empty qcow2 (version 3) image, optionally over a backing file, as ``qemu-img create``.

Layout, 64 KiB clusters: cluster 0 the header (with the backing format extension and the backing
file name), cluster 1 the refcount table, cluster 2 its one refcount block (16-bit refcounts), then
the L1 table.  Every cluster in use has refcount 1, so ``qemu-img check`` finds nothing to fix.
Used for ``-snapshot``'s temporary overlays (:mod:`pyvmm.block.graph`), and by tests.
"""

from __future__ import annotations

import os
import struct

from pyvmm.block.base import BlockError

CLUSTER_BITS = 16
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
_EXT_BACKING_FORMAT = 0xE2792ACA
_HEADER_LEN = 104
assert _HEADER.size == _HEADER_LEN


def create_qcow2(fd: int, size: int, backing: str | None = None, backing_fmt: str | None = None) -> None:
    """Write an empty qcow2 image of ``size`` bytes (a multiple of 512) to the empty file ``fd``."""
    cs = 1 << CLUSTER_BITS
    if size <= 0 or size % 512:
        raise BlockError(f"qcow2: image size {size} must be a positive multiple of 512")
    l2_covers = cs * (cs // 8)
    l1_size = -(-size // l2_covers)
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    rt_off, rb_off, l1_off = cs, 2 * cs, 3 * cs
    used = 3 + l1_clusters
    if used > cs // 2:  # one refcount block (16-bit entries) describes 32768 clusters
        raise BlockError(f"qcow2: image size {size} is too large")
    ext = b""
    if backing_fmt:
        data = backing_fmt.encode()
        ext += struct.pack(">II", _EXT_BACKING_FORMAT, len(data)) + data.ljust(-(-len(data) // 8) * 8, b"\0")
    ext += struct.pack(">II", 0, 0)
    name = backing.encode() if backing else b""
    if len(name) > 1023:
        raise BlockError("qcow2: backing file name is longer than 1023 bytes")
    backing_off = _HEADER_LEN + len(ext) if name else 0
    if backing_off + len(name) > cs:
        raise BlockError("qcow2: header does not fit its cluster")
    header = _HEADER.pack(b"QFI\xfb", 3, backing_off, len(name), CLUSTER_BITS, size, 0, l1_size, l1_off,
                          rt_off, 1, 0, 0, 0, 0, 0, 4, _HEADER_LEN)
    os.pwrite(fd, (header + ext + name).ljust(cs, b"\0"), 0)
    os.pwrite(fd, struct.pack(">Q", rb_off).ljust(cs, b"\0"), rt_off)
    os.pwrite(fd, struct.pack(f">{used}H", *([1] * used)).ljust(cs, b"\0"), rb_off)
    os.pwrite(fd, bytes(l1_size * 8), l1_off)  # the file ends with the L1 table, as qemu-img's
