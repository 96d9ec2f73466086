"""qcow2 images (versions 2 and 3): reads, writes with cluster allocation, a read-only backing file.

Layout recap (all big-endian, see QEMU's docs/interop/qcow2.txt): a header
names the cluster size, the L1 table and the refcount table.  A guest offset
splits into an L1 index, an L2 index and an offset in the cluster; the L2
entry holds the host offset of the data cluster (bit 63 "COPIED" = refcount
is exactly one, bit 62 compressed, bit 0 "reads as zero" in v3).  Every
host cluster in use has a refcount in a refcount block, found through the
refcount table.

What this implementation does:

* reads: allocated clusters come from this file, zero clusters read as
  zeroes, unallocated clusters come from the backing file (raw or qcow2,
  opened read-only) or read as zeroes past its end / without one;
* writes: a write to an allocated cluster goes in place; otherwise a new
  cluster is appended at the end of the file, the parts of it the write
  does not cover are filled from the backing file (copy-on-write), then its
  refcount is set and the L2 entry (allocating the L2 table first if needed)
  is written.  Refcount blocks are added, and the refcount table is moved to
  a bigger place, as the file grows.  Metadata is always consistent after a
  request completes, so no dirty bit is needed and ``qemu-img check``
  passes after a clean or unclean stop (at worst a leaked cluster);
* write-zeroes uses v3 zero clusters for whole clusters;
* discard (and write-zeroes with unmap) frees whole clusters, as QEMU does:
  the L2 entry goes first (a v3 zero cluster where a backing file would
  otherwise show through; on a v2 image with a backing file nothing is
  freed), then the refcount drops to 0 and the host range is punched out of
  the file, so the image takes less space on the host.  A freed cluster is
  handed out again only after the next flush, when the L2 update that
  stopped referencing it is on disk: a power cut can then leak a cluster,
  never make two guest offsets share one.  Parts of clusters are left as
  they are (discard is advisory).

Refused with a clear :class:`BlockError`: encryption, compressed clusters
(found by scanning the L2 tables at open), external data files, extended
L2 entries, unknown incompatible features, dirty/corrupt images, refcount
widths below 8 bits, and writes to images with internal snapshots.

Guest data moves between the file and guest memory with ``preadv`` /
``pwritev`` on the caller's memoryviews; only copy-on-write padding taken
from the backing file is staged in Python buffers.
"""

from __future__ import annotations

import logging
import os
import struct
from enum import IntFlag

from pyvmm.block.base import (
    MAX_BACKING_DEPTH,
    BlockBackend,
    BlockError,
    check_image_file,
    open_image_perms,
    probe_format,
)
from pyvmm.block.iov import FileStats, Iov, iov_len, iov_slice, iov_zero, preadv_full, pwritev_full
from pyvmm.block.lock import ImageLock, Perm, backing_perms, device_perms, metadata_perms
from pyvmm.block.raw import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"
_HDR_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HDR_V3 = struct.Struct(">QQQII")
assert _HDR_V2.size == 72 and _HDR_V3.size == 32
_U64 = struct.Struct(">Q")

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L2_COMPRESSED = 1 << 62
COPIED = 1 << 63
L2_ZERO = 1

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441

L2_CACHE_TABLES = 64
_ZERO_CHUNK = memoryview(bytes(1 << 16))


class Incompat(IntFlag):
    DIRTY = 1
    CORRUPT = 2
    DATA_FILE = 4
    COMPRESSION = 8
    EXTENDED_L2 = 16


class Qcow2Image:
    """A qcow2 image file (see the module docstring for what is supported)."""

    def __init__(self, path: str, read_only: bool = False, *, perms: tuple[Perm, Perm] | None = None,
                 locking: str = "auto", chain: tuple[tuple[int, int], ...] = (),
                 backing_override: bool = False, backing_image: BlockBackend | None = None) -> None:
        """``backing_override``: use ``backing_image`` (None: no backing file) instead of the
        backing file the header names (QEMU's ``backing`` option of a -blockdev qcow2 node)."""
        self.path = path
        self._backing_override = backing_override
        self._backing_image = backing_image
        self.read_only = read_only
        try:
            self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise BlockError(f"{path}: {e.strerror}") from None
        self.backing: BlockBackend | None = None
        self._l2_cache: dict[int, bytearray] = {}
        self._freed: list[int] = []         # host clusters freed since the last flush
        self._reusable: list[int] = []      # freed before the last flush: safe to hand out again
        self._perms = perms or device_perms(read_only, False)
        self._chain = chain
        self._touched = False               # nothing written to the file yet (see _before_write)
        self.file_stats = FileStats()       # the host file's, as QEMU's file node reports them
        try:
            st = os.fstat(self.fd)
            ident = (st.st_dev, st.st_ino)
            if ident in chain:
                raise BlockError(f"{path}: backing chain loop: the image is its own backing file "
                                 "(directly or through others)")
            self._chain = (*chain, ident)
            self.lock = ImageLock(self.fd, path, locking)
            self.lock.set_perm(*metadata_perms(*self._perms, writable=not read_only))
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------
    def _bad(self, why: str) -> BlockError:
        return BlockError(f"{self.path}: qcow2: {why}")

    def _pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def _open(self) -> None:
        raw = self._pread(_HDR_V2.size + _HDR_V3.size, 0)
        (magic, self.version, backing_off, backing_len, self.cluster_bits, self.size, crypt, self.l1_size,
         self.l1_offset, self.rt_offset, self.rt_clusters, self.nb_snapshots, self.snap_off) = _HDR_V2.unpack_from(raw)
        if magic != QCOW2_MAGIC:
            raise self._bad("not a qcow2 image (bad magic)")
        if self.version not in (2, 3):
            raise self._bad(f"version {self.version} is not supported (2 or 3)")
        if not 9 <= self.cluster_bits <= 21:
            raise self._bad(f"cluster_bits {self.cluster_bits} is out of range 9..21")
        if crypt:
            raise self._bad("encrypted images are not supported")
        self.cluster_size = cs = 1 << self.cluster_bits
        self.l2_entries = cs // 8
        self.incompat = self.compat = self.autoclear = 0
        self.refcount_order = 4
        header_len = 72
        if self.version == 3:
            self.incompat, self.compat, self.autoclear, self.refcount_order, header_len = _HDR_V3.unpack_from(raw, 72)
            known = int(Incompat.DIRTY | Incompat.CORRUPT | Incompat.DATA_FILE | Incompat.COMPRESSION
                        | Incompat.EXTENDED_L2)
            if self.incompat & ~known:
                raise self._bad(f"unknown incompatible features {self.incompat & ~known:#x}")
            if self.incompat & Incompat.CORRUPT:
                raise self._bad("image is marked corrupt; run qemu-img check -r all")
            if self.incompat & Incompat.DIRTY:
                raise self._bad("image is dirty (lazy refcounts not flushed); run qemu-img check -r all")
            if self.incompat & Incompat.DATA_FILE:
                raise self._bad("external data files are not supported")
            if self.incompat & Incompat.EXTENDED_L2:
                raise self._bad("extended L2 entries (subclusters) are not supported")
            if header_len < 104 or header_len % 8:
                raise self._bad(f"bad header length {header_len}")
        if not 3 <= self.refcount_order <= 6:
            # (the order, not 1 << order: a hostile header may hold 2**32 - 1, a 2**32-bit number)
            raise self._bad(f"refcount order {self.refcount_order} is not supported (3..6, 8- to 64-bit refcounts)")
        self.refcount_bytes = (1 << self.refcount_order) // 8
        self.refs_per_block = cs // self.refcount_bytes
        if self.size == 0 or self.size > (1 << 56):
            raise self._bad(f"bad virtual size {self.size}")
        needed_l1 = -(-self.size // (cs * self.l2_entries))
        if self.l1_size < needed_l1 or self.l1_size > (32 << 20) // 8:
            raise self._bad(f"L1 table of {self.l1_size} entries does not fit size {self.size}")
        for what, off in (("L1 table", self.l1_offset), ("refcount table", self.rt_offset)):
            if off % cs or off == 0:
                raise self._bad(f"{what} offset {off:#x} is not cluster aligned")
        if not 1 <= self.rt_clusters <= (8 << 20) // cs:
            raise self._bad(f"bad refcount table size {self.rt_clusters} clusters")
        if self.nb_snapshots and not self.read_only:
            raise self._bad("images with internal snapshots can only be opened read-only")
        # Every table must lie inside the file: an offset past its end would make reads come from
        # nowhere and writes land anywhere (a hostile header can say 2**56, or more than pread takes).
        self._file_end = -(-os.fstat(self.fd).st_size // cs) * cs
        if backing_off and (backing_off > cs or backing_off + backing_len > cs):
            raise self._bad(f"backing file name at {backing_off:#x}+{backing_len} is outside the header cluster")
        for what, off, size in (("L1 table", self.l1_offset, 8 * self.l1_size),
                                ("refcount table", self.rt_offset, self.rt_clusters * cs)):
            self._check_in_file(what, off, size)

        backing_fmt = self._read_extensions(header_len, backing_off)
        l1 = self._pread(8 * self.l1_size, self.l1_offset)
        self.l1 = [e for (e,) in struct.iter_unpack(">Q", l1)]
        rt = self._pread(self.rt_clusters * cs, self.rt_offset)
        self.rt = [e for (e,) in struct.iter_unpack(">Q", rt)]
        self._check_tables()
        self._end = -(-os.fstat(self.fd).st_size // cs) * cs
        # Metadata clusters, for the overlap checks (QEMU's overlap-check=cached): L2 tables and
        # refcount blocks by host offset; the header, L1 and refcount tables are ranges.
        self._l2_tables = {e & OFFSET_MASK for e in self.l1 if e & OFFSET_MASK}
        self._refblocks = {e & OFFSET_MASK for e in self.rt if e & OFFSET_MASK}
        self._corrupt = False

        #: the backing file name and format the header gives (query-block's backing-filename)
        self.backing_name: str | None = None
        self.backing_format = backing_fmt
        if backing_off and 0 < backing_len <= 1023:
            self.backing_name = self._pread(backing_len, backing_off).decode("utf-8", "replace")
        if self._backing_override:
            self.backing = self._backing_image
        elif backing_off:
            self._open_backing(backing_off, backing_len, backing_fmt)
        # Nothing is written here: the autoclear bits are cleared by the first write (_before_write),
        # so an image opened by a VM that then fails to start is left exactly as it was.

    def _open_backing(self, backing_off: int, backing_len: int, backing_fmt: str | None) -> None:
        """Open the backing file read-only, locked shared; refuse loops, directories, missing
        files and over-deep chains with one line."""
        if backing_len == 0 or backing_len > 1023:
            raise self._bad(f"bad backing file name length {backing_len}")
        name = self._pread(backing_len, backing_off).decode("utf-8", "replace")
        if "\0" in name:
            raise self._bad("backing file name contains a NUL byte")
        bpath = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        if len(self._chain) >= MAX_BACKING_DEPTH:
            raise self._bad(f"backing chain is deeper than {MAX_BACKING_DEPTH} images")
        if not os.path.lexists(bpath):
            raise self._bad(f"backing file {name} not found")
        try:
            check_image_file(bpath)
            fmt = backing_fmt or probe_format(bpath)
            if fmt not in ("raw", "qcow2"):
                raise BlockError(f"format {fmt!r} is not supported")
            self.backing = open_image_perms(bpath, fmt, True, backing_perms(*self._perms), chain=self._chain)
        except BlockError as e:
            msg = str(e)
            raise self._bad(f"backing file {name}: {msg.removeprefix(bpath + ': ')}") from None

    # -- host file writes: every one goes through these, for the file's statistics ------------------
    def _pwrite(self, data: bytes, offset: int) -> None:
        os.pwrite(self.fd, data, offset)
        self.file_stats.written(offset + len(data))

    def _pwritev(self, iov: Iov, offset: int) -> None:
        pwritev_full(self.fd, iov, offset)
        self.file_stats.written(offset + iov_len(iov))

    def _before_write(self) -> None:
        """Called before the first change to the file: clear the autoclear bits.  We do not
        maintain whatever they vouch for (e.g. bitmaps), so the spec asks us to clear them."""
        if self._touched:
            return
        self._touched = True
        if self.autoclear:
            self._pwrite(_U64.pack(0), 88)
            self.autoclear = 0

    def _read_extensions(self, header_len: int, backing_off: int) -> str | None:
        if self.version < 3:
            header_len = 72
        cs = self.cluster_size
        off = header_len
        backing_fmt = None
        while off + 8 <= cs:
            etype, elen = struct.unpack(">II", self._pread(8, off))
            if etype == EXT_END:
                break
            if off + 8 + elen > cs:
                raise self._bad("header extension runs past the first cluster")
            data = self._pread(elen, off + 8)
            if etype == EXT_BACKING_FORMAT:
                backing_fmt = data.decode("ascii", "replace")
            elif etype == EXT_DATA_FILE:
                raise self._bad("external data files are not supported")
            off += 8 + ((elen + 7) & ~7)
        return backing_fmt

    def _check_in_file(self, what: str, offset: int, size: int) -> None:
        if offset + size > self._file_end:
            raise self._bad(f"{what} at {offset:#x}+{size:#x} lies past the end of the file "
                            f"({self._file_end:#x} bytes); the image is corrupt")

    def _check_tables(self) -> None:
        """Reject what we cannot serve (compressed clusters) and gross corruption, up front: tables
        and clusters that are unaligned or lie past the end of the file."""
        cs = self.cluster_size
        for i, e in enumerate(self.rt):
            rb_off = e & OFFSET_MASK
            if rb_off:
                if rb_off % cs:
                    raise self._bad(f"refcount table entry {i} points to unaligned refcount block {rb_off:#x}")
                self._check_in_file(f"refcount block {i}", rb_off, cs)
        for i, e in enumerate(self.l1):
            l2_off = e & OFFSET_MASK
            if not l2_off:
                continue
            if l2_off % cs:
                raise self._bad(f"L1 entry {i} points to unaligned L2 table {l2_off:#x}")
            self._check_in_file(f"L2 table {i}", l2_off, cs)
            table = self._l2_table(l2_off)
            for (entry,) in struct.iter_unpack(">Q", table):
                if entry & L2_COMPRESSED:
                    raise self._bad("compressed clusters are not supported "
                                    "(convert with qemu-img convert -O qcow2 without -c)")
                host = entry & OFFSET_MASK
                if host % cs:
                    raise self._bad(f"L2 table at {l2_off:#x} has an unaligned cluster offset")
                if host:
                    self._check_in_file(f"data cluster (L2 table at {l2_off:#x})", host, cs)
        self._l2_cache.clear()

    # -- overlap checks ----------------------------------------------------------------------------
    def _metadata_at(self, host: int, length: int, allowed: str | None = None) -> str | None:
        """Which metadata (other than ``allowed``) the host range [host, host+length) overlaps."""
        cs = self.cluster_size
        end = host + length

        def hits(start: int, size: int) -> bool:
            return start < end and host < start + size

        kinds = []
        if hits(0, cs):
            kinds.append("qcow2 header")
        if hits(self.l1_offset, max(8 * self.l1_size, 1)):
            kinds.append("active L1 table")
        if hits(self.rt_offset, self.rt_clusters * cs):
            kinds.append("refcount table")
        if self.nb_snapshots and hits(self.snap_off & ~(cs - 1), cs):
            kinds.append("snapshot table")
        for c in range(host & ~(cs - 1), end, cs):
            if c in self._l2_tables:
                kinds.append("active L2 table")
            if c in self._refblocks:
                kinds.append("refcount block")
        return next((k for k in kinds if k != allowed), None)

    def _check_overlap(self, host: int, length: int, what: str, allowed: str | None = None) -> None:
        """Refuse to write ``what`` over metadata (other than ``allowed``): the image is corrupt.
        As QEMU does, it is then marked corrupt (v3) and takes no more writes."""
        if self._corrupt:
            raise self._bad("image is marked corrupt; further writes are refused (run qemu-img check -r all)")
        kind = self._metadata_at(host, length, allowed)
        if kind is None:
            return
        self._corrupt = True
        log.error("%s: qcow2: Marking image as corrupt: Preventing invalid write of %s on metadata "
                  "(overlaps with %s at %#x); further writes are refused", self.path, what, kind, host)
        if self.version >= 3:
            self.incompat |= Incompat.CORRUPT
            self._pwrite(_U64.pack(self.incompat), 72)
            os.fdatasync(self.fd)
        raise self._bad(f"write of {what} at {host:#x} would overwrite the {kind}; image marked corrupt")

    # -- metadata helpers -------------------------------------------------------------------------
    def _l2_table(self, l2_off: int) -> bytearray:
        table = self._l2_cache.get(l2_off)
        if table is None:
            if len(self._l2_cache) >= L2_CACHE_TABLES:
                self._l2_cache.pop(next(iter(self._l2_cache)))
            table = bytearray(self._pread(self.cluster_size, l2_off))
            self._l2_cache[l2_off] = table
        return table

    def _split(self, offset: int) -> tuple[int, int]:
        cluster = offset >> self.cluster_bits
        return cluster // self.l2_entries, cluster % self.l2_entries

    def _l2_entry(self, offset: int) -> int:
        l1_index, l2_index = self._split(offset)
        if l1_index >= self.l1_size:
            return 0
        l2_off = self.l1[l1_index] & OFFSET_MASK
        if not l2_off:
            return 0
        return _U64.unpack_from(self._l2_table(l2_off), 8 * l2_index)[0]

    def _set_l2_entry(self, offset: int, entry: int) -> None:
        l1_index, l2_index = self._split(offset)
        if l1_index >= self.l1_size:
            raise self._bad(f"offset {offset:#x} is beyond the L1 table")
        l2_off = self.l1[l1_index] & OFFSET_MASK
        if not l2_off:
            l2_off = self._alloc_cluster()
            self._pwrite(bytes(self.cluster_size), l2_off)
            self._l2_tables.add(l2_off)
            self.l1[l1_index] = l2_off | COPIED
            self._pwrite(_U64.pack(l2_off | COPIED), self.l1_offset + 8 * l1_index)
        elif not self.l1[l1_index] & COPIED:
            raise self._bad("L2 table is shared with a snapshot; writing it is not supported")
        else:
            self._check_overlap(l2_off, self.cluster_size, "an L2 table", allowed="active L2 table")
        table = self._l2_table(l2_off)
        _U64.pack_into(table, 8 * l2_index, entry)
        self._pwrite(_U64.pack(entry), l2_off + 8 * l2_index)

    def _alloc_cluster(self) -> int:
        """A free cluster (one discarded before the last flush, else a new one at the end of
        the file), with refcount 1."""
        if self._reusable:
            off = self._reusable.pop()
        else:
            off = self._end
            self._end += self.cluster_size
        self._check_overlap(off, self.cluster_size, "a new cluster")
        self._set_refcount(off, 1)
        return off

    def _set_refcount(self, host_off: int, value: int) -> None:
        cluster = host_off >> self.cluster_bits
        rt_index, rb_index = divmod(cluster, self.refs_per_block)
        if rt_index >= len(self.rt):
            self._grow_refcount_table(rt_index)
        rb_off = self.rt[rt_index] & OFFSET_MASK
        if not rb_off:
            rb_off = self._end
            self._end += self.cluster_size
            self._check_overlap(rb_off, self.cluster_size, "a new refcount block")
            self._pwrite(bytes(self.cluster_size), rb_off)
            self._refblocks.add(rb_off)
            self.rt[rt_index] = rb_off
            self._pwrite(_U64.pack(rb_off), self.rt_offset + 8 * rt_index)
            self._set_refcount(rb_off, 1)  # the new block usually describes itself
        else:
            self._check_overlap(rb_off, self.cluster_size, "a refcount block", allowed="refcount block")
        width = self.refcount_bytes
        self._pwrite(value.to_bytes(width, "big"), rb_off + width * rb_index)

    def _grow_refcount_table(self, needed_index: int) -> None:
        cs = self.cluster_size
        old_off, old_clusters = self.rt_offset, self.rt_clusters
        entries = max(2 * len(self.rt), needed_index + 1)
        new_clusters = -(-entries * 8 // cs)
        # Room for the refcount blocks that describe the new table itself, too.
        new_off = self._end
        self._end += new_clusters * cs
        self._check_overlap(new_off, new_clusters * cs, "a new refcount table")
        self.rt.extend([0] * (new_clusters * cs // 8 - len(self.rt)))
        self._pwrite(b"".join(_U64.pack(e) for e in self.rt), new_off)
        os.fdatasync(self.fd)
        self._pwrite(_U64.pack(new_off) + struct.pack(">I", new_clusters), 48)
        self.rt_offset, self.rt_clusters = new_off, new_clusters
        for i in range(new_clusters):
            self._set_refcount(new_off + i * cs, 1)
        for i in range(old_clusters):
            self._set_refcount(old_off + i * cs, 0)
        log.debug("%s: refcount table moved to %#x (%d clusters)", self.path, new_off, new_clusters)

    # -- data path ------------------------------------------------------------------------------
    def _chunks(self, offset: int, length: int):
        """(position in request, guest offset, bytes) pieces that stay within one cluster."""
        cs = self.cluster_size
        pos = 0
        while pos < length:
            goff = offset + pos
            n = min(cs - (goff & (cs - 1)), length - pos)
            yield pos, goff, n
            pos += n

    def _read_backing(self, iov: Iov, offset: int) -> None:
        b = self.backing
        if b is None or offset >= b.size:
            iov_zero(iov)
            return
        n = iov_len(iov)
        have = min(n, b.size - offset)
        b.readv(iov_slice(iov, 0, have), offset)
        if have < n:
            iov_zero(iov_slice(iov, have, n - have))

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._bad(f"request {offset:#x}+{length:#x} is beyond the image size {self.size:#x}")

    def readv(self, iov: Iov, offset: int) -> None:
        length = iov_len(iov)
        self._check_range(offset, length)
        cs = self.cluster_size
        for pos, goff, n in self._chunks(offset, length):
            part = iov_slice(iov, pos, n)
            entry = self._l2_entry(goff)
            host = entry & OFFSET_MASK
            if entry & L2_COMPRESSED:
                raise self._bad("compressed clusters are not supported")
            if self.version >= 3 and entry & L2_ZERO:
                iov_zero(part)
            elif host:
                preadv_full(self.fd, part, host + (goff & (cs - 1)))
            else:
                self._read_backing(part, goff)

    def writev(self, iov: Iov, offset: int) -> None:
        if self.read_only:
            raise self._bad("image is read-only")
        length = iov_len(iov)
        self._check_range(offset, length)
        self._before_write()
        for pos, goff, n in self._chunks(offset, length):
            self._write_cluster(iov_slice(iov, pos, n), goff, n)

    def _writable_entry(self, goff: int) -> tuple[int, int]:
        """Guest cluster ``goff``'s L2 entry and host offset, refusing what cannot be changed in place."""
        entry = self._l2_entry(goff)
        host = entry & OFFSET_MASK
        if entry & L2_COMPRESSED:
            raise self._bad("compressed clusters are not supported")
        if host and not entry & COPIED:
            raise self._bad("cluster is shared with a snapshot; writing it is not supported")
        return entry, host

    def _write_cluster(self, part: Iov, goff: int, n: int) -> None:
        cs = self.cluster_size
        in_cluster = goff & (cs - 1)
        cluster_start = goff - in_cluster
        entry, host = self._writable_entry(goff)
        zero = self.version >= 3 and bool(entry & L2_ZERO)
        if host and not zero:
            self._check_overlap(host, cs, "guest data")
            self._pwritev(part, host + in_cluster)
            return
        # A fresh cluster (or a preallocated zero cluster): fill what the write leaves out.
        tail_len = cs - in_cluster - n
        head, tail = bytearray(in_cluster), bytearray(tail_len)
        if not zero:
            if in_cluster:
                self._read_backing([memoryview(head)], cluster_start)
            if tail_len:
                self._read_backing([memoryview(tail)], goff + n)
        if not host:
            host = self._alloc_cluster()
        else:
            self._check_overlap(host, cs, "guest data")
        self._pwritev([memoryview(head), *part, memoryview(tail)], host)
        self._set_l2_entry(goff, host | COPIED)

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)
            # the L2 entries that stopped referencing these clusters are on disk now
            self._reusable.extend(self._freed)
            self._freed.clear()

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise self._bad("image is read-only")
        self._check_range(offset, length)
        self._before_write()
        for _pos, goff, n in self._chunks(offset, length):
            if n == self.cluster_size:
                self._unmap_cluster(goff)

    def _unmap_cluster(self, goff: int) -> bool:
        """Drop guest cluster ``goff``'s data cluster, so that it reads as zeroes (unallocated
        without a backing file, a v3 zero cluster with one).  False, and nothing changed, on a
        v2 image with a backing file: it has no zero clusters, the backing data would show."""
        entry, host = self._writable_entry(goff)
        if self.backing is None:
            new = 0
        elif self.version >= 3:
            new = L2_ZERO
        else:
            return False
        if host:
            self._check_overlap(host, self.cluster_size, "a discard")
        if entry != new:
            self._set_l2_entry(goff, new)
        if host:
            self._set_refcount(host, 0)
            if fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, host, self.cluster_size):
                self.file_stats.discarded(self.cluster_size)
            self._freed.append(host)
        return True

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if self.read_only:
            raise self._bad("image is read-only")
        self._check_range(offset, length)
        self._before_write()
        cs = self.cluster_size
        for _pos, goff, n in self._chunks(offset, length):
            if unmap and n == cs and self._unmap_cluster(goff):
                continue
            if self.version >= 3 and n == cs:
                entry, host = self._writable_entry(goff)
                if entry != (host | COPIED | L2_ZERO if host else L2_ZERO):
                    self._set_l2_entry(goff, (host | COPIED | L2_ZERO) if host else L2_ZERO)
                continue
            zeros = [_ZERO_CHUNK[:min(n - o, len(_ZERO_CHUNK))] for o in range(0, n, len(_ZERO_CHUNK))]
            self._write_cluster(zeros, goff, n)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
