"""virtio-blk (virtio 1.x section 5.2) on a raw or qcow2 image.

One request queue.  Each request is a chain: a 16-byte device-readable
header (type, reserved, sector), data (device-readable for writes,
device-writable for reads), and a one-byte device-writable status.  The
header and data may be split across descriptors in any way, so the chain is
treated as two byte streams and sliced with :mod:`pyvmm.block.iov`; data
goes between the image and the guest's buffers with ``preadv``/``pwritev``.

Supported: IN, OUT, FLUSH, GET_ID (serial), DISCARD, WRITE_ZEROES; read-only
drives (``VIRTIO_BLK_F_RO``; writes fail with IOERR).  Every sector range is
checked against the capacity; a malformed request fails with IOERR (or, if it
has no room for a status byte, is returned with nothing written).

Threading: requests run in :meth:`handle_queue` with the device lock held,
on the device's loop (an iothread) when one is given.
"""

from __future__ import annotations

import logging
import struct
from enum import IntEnum

from pyvmm.block.base import SECTOR_SIZE, BlockBackend, BlockError
from pyvmm.block.iov import iov_from_bytes, iov_slice, iov_to_bytes
from pyvmm.devices.virtio.device import DeviceId, VirtioDevice
from pyvmm.devices.virtio.queue import MAX_CHAIN_BYTES, DescChain, Virtqueue
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.qdev import DeviceContext, DeviceProps, Prop, PropType, VirtioType
from pyvmm.ratelimit import guest_log

log = logging.getLogger(__name__)

ID_BYTES = 20
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
MAX_DISCARD_SECTORS = 1 << 22
MAX_SEGMENTS = 32
#: Largest data segment (descriptor) the driver may use (VIRTIO_BLK_F_SIZE_MAX).  With seg_max
#: segments this keeps any request under the virtqueue's chain-length cap (MAX_CHAIN_BYTES).
SIZE_MAX = 1 << 20


class BlkFeature(IntEnum):
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class ReqType(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class BlkStatus(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class VirtioBlk(VirtioDevice):
    """A virtio block device backed by a :class:`~pyvmm.block.base.BlockBackend`."""

    vmstate_migratable = True  # its whole state is in pyvmm.devices.virtio.state

    device_id = DeviceId.BLOCK

    def __init__(self, memory: GuestMemory, backend: BlockBackend, *, serial: str = "",
                 read_only: bool | None = None, name: str = "virtio-blk", loop: MainLoop | None = None,
                 queue_size: int = 256) -> None:
        self.backend = backend
        self.read_only = backend.read_only if read_only is None else (read_only or backend.read_only)
        self.serial = serial.encode("ascii", "replace")[:ID_BYTES]
        self.capacity = backend.size // SECTOR_SIZE
        self.seg_max = queue_size - 2
        assert self.seg_max * SIZE_MAX + 4096 <= MAX_CHAIN_BYTES, "requests could exceed the chain cap"
        features = ((1 << BlkFeature.SIZE_MAX) | (1 << BlkFeature.SEG_MAX) | (1 << BlkFeature.BLK_SIZE)
                    | (1 << BlkFeature.FLUSH))
        if self.read_only:
            features |= 1 << BlkFeature.RO
        else:
            features |= (1 << BlkFeature.DISCARD) | (1 << BlkFeature.WRITE_ZEROES)
        super().__init__(memory, name=name, queue_sizes=[queue_size], features=features, loop=loop)

    def config_bytes(self) -> bytes:
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.capacity,       # capacity (512-byte sectors)
            SIZE_MAX,            # size_max
            self.seg_max,        # seg_max
            0, 0, 0,             # geometry: cylinders, heads, sectors
            SECTOR_SIZE,         # blk_size
            0, 0, 1, 0,          # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
            0, 0,                # writeback, unused0
            1,                   # num_queues
            MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1,  # max_discard_sectors, max_discard_seg, alignment
            MAX_DISCARD_SECTORS, MAX_SEGMENTS,     # max_write_zeroes_sectors, max_write_zeroes_seg
            1,                   # write_zeroes_may_unmap
        )

    # -- requests --------------------------------------------------------------------------------
    def handle_queue(self, queue: Virtqueue) -> None:
        pushed = False
        while (chain := queue.pop()) is not None:
            try:
                written = self._request(chain)
            finally:
                chain.release()
            queue.push(chain.head, written)
            pushed = True
        if pushed:
            self.notify_used(queue)

    def _request(self, chain: DescChain) -> int:
        """Serve one request; returns the number of bytes written into the chain."""
        if chain.read_len < HEADER.size or chain.write_len < 1:
            self._log_error(f"malformed request at head {chain.head}: {chain.read_len} readable, "
                            f"{chain.write_len} writable bytes")
            return 0
        rtype, _reserved, sector = HEADER.unpack(iov_to_bytes(iov_slice(chain.readable, 0, HEADER.size)))
        data_out = iov_slice(chain.readable, HEADER.size, chain.read_len - HEADER.size)
        in_len = chain.write_len - 1
        data_in = iov_slice(chain.writable, 0, in_len)
        status_iov = iov_slice(chain.writable, in_len, 1)
        written = 0
        try:
            status, written = self._dispatch(rtype, sector, data_out, chain.read_len - HEADER.size,
                                             data_in, in_len)
        except (BlockError, OSError) as e:
            self._log_error(f"request type {rtype} sector {sector}: {e}")
            status = BlkStatus.IOERR
        status_iov[0][0] = status
        return written + 1

    def _dispatch(self, rtype: int, sector: int, data_out: list[memoryview], out_len: int,
                  data_in: list[memoryview], in_len: int) -> tuple[BlkStatus, int]:
        if rtype == ReqType.IN:
            if out_len or not self._in_range(sector, in_len):  # data must be device-writable
                return BlkStatus.IOERR, 0
            self.backend.readv(data_in, sector * SECTOR_SIZE)
            return BlkStatus.OK, in_len
        if rtype == ReqType.OUT:
            if self.read_only or in_len or not self._in_range(sector, out_len):  # data device-readable
                return BlkStatus.IOERR, 0
            self.backend.writev(data_out, sector * SECTOR_SIZE)
            return BlkStatus.OK, 0
        if rtype == ReqType.FLUSH:
            if not self.read_only:
                self.backend.flush()
            return BlkStatus.OK, 0
        if rtype == ReqType.GET_ID:
            n = iov_from_bytes(data_in, self.serial.ljust(ID_BYTES, b"\0")[:min(ID_BYTES, in_len)])
            return BlkStatus.OK, n
        if rtype in (ReqType.DISCARD, ReqType.WRITE_ZEROES):
            return self._segments(rtype, data_out, out_len), 0
        return BlkStatus.UNSUPP, 0

    def _segments(self, rtype: int, data_out: list[memoryview], out_len: int) -> BlkStatus:
        if self.read_only:
            return BlkStatus.IOERR
        count = out_len // SEGMENT.size
        if count == 0 or count > MAX_SEGMENTS or out_len % SEGMENT.size:
            return BlkStatus.IOERR
        raw = iov_to_bytes(data_out)
        segs = [SEGMENT.unpack_from(raw, i * SEGMENT.size) for i in range(count)]
        for sector, num, flags in segs:
            if num > MAX_DISCARD_SECTORS or not self._in_range(sector, num * SECTOR_SIZE):
                return BlkStatus.IOERR
            if flags & ~1 or (rtype == ReqType.DISCARD and flags):
                return BlkStatus.UNSUPP
        for sector, num, flags in segs:
            if rtype == ReqType.DISCARD:
                self.backend.discard(sector * SECTOR_SIZE, num * SECTOR_SIZE)
            else:
                self.backend.write_zeroes(sector * SECTOR_SIZE, num * SECTOR_SIZE, bool(flags & 1))
        return BlkStatus.OK

    def _in_range(self, sector: int, length: int) -> bool:
        if length % SECTOR_SIZE:
            return False
        return sector + length // SECTOR_SIZE <= self.capacity

    def _log_error(self, msg: str) -> None:
        guest_log(log, logging.WARNING, "%s: %s", self.name, msg)

    def close(self) -> None:
        with self.lock:
            self.backend.close()


# -- its registry entry (pyvmm.qdev): virtio-blk-pci, virtio-blk-device ---------------------------
_FORMATS = (None, "raw", "qcow2")


def _create(ctx: DeviceContext, props: DeviceProps) -> VirtioBlk:
    from pyvmm.errors import ConfigError

    drive_id, path = props.get_str("drive"), props.get_str("file")
    read_only, share_rw = props.get_bool("readonly"), props.get_bool("share-rw")
    if drive_id is not None:
        if path is not None or props.is_set("format"):
            raise ConfigError("drive= names a -drive or -blockdev node; file= and format= go without it")
        fmt = None
    elif path is not None:  # pyvmm's shorthand: the image on the device itself
        fmt = props.get_str("format")
        if fmt not in _FORMATS:
            raise ConfigError(f"format={fmt} is not supported (raw or qcow2)")
    else:
        raise ConfigError("drive=ID or file=PATH is required")
    # The block graph (pyvmm.block.graph) opens the image with the device's permissions (locked as
    # QEMU locks it; a probed raw image warns as QEMU does) and counts its I/O for query-blockstats.
    backend = ctx.block_backend(drive_id, read_only=read_only, share_rw=share_rw, device_id=props.id,
                                file=path, fmt=fmt)
    image = backend.image
    serial = props.get_str("serial") or backend.serial
    return VirtioBlk(ctx.memory, image, serial=serial, read_only=read_only or image.read_only,
                     name=props.name("virtio-blk"), loop=ctx.iothread)


DEVICE_TYPES = [VirtioType(
    "virtio-blk", _create,
    (Prop("drive", PropType.STR, None, "ID of a -drive, or node-name of a -blockdev, to use as a backend"),
     Prop("serial", PropType.STR),
     Prop("file", PropType.STR, None, "pyvmm: an image file, instead of drive="),
     Prop("format", PropType.STR, None, "pyvmm: with file=, raw or qcow2 (probed when absent)"),
     Prop("readonly", PropType.BOOL, None, "pyvmm: present the disk read-only"),
     Prop("share-rw", PropType.BOOL, False, "let other users (this VM's or another process's) write the image"),
     Prop("bootindex", PropType.INT32, None, "boot order among bootable devices (pyvmm boots -kernel; "
          "accepted, as QEMU accepts it there)")),
    "a disk")]
