"""Fuzz target: virtio-blk requests (header, data, status) against a model of the disk.

Hypothesis builds batches of requests with any type, reserved word and sector (valid, at the end
of the disk, past it, 2**64-1), data and status buffers of any length (the 16-byte header may be
short, long, split over descriptors or run into the data; the status may be missing or longer than
one byte), DISCARD/WRITE_ZEROES segment lists with any fields, in direct or indirect chains.  The
device serves them on a raw image; a model of the disk and of the virtio-blk rules says what each
request must do.

Asserted: every request is completed, with the status byte (the last writable byte) and used
length the rules give; read data equals the model's; the image file equals the model afterwards;
nothing in guest memory changes except the request's device-writable bytes that the rules let
the device write and the used ring; the device never needs a reset and still answers GET_ID.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

from hypothesis import strategies as st

from pyvmm.block.raw import RawImage
from pyvmm.devices.virtio.blk import MAX_DISCARD_SECTORS, MAX_SEGMENTS, VirtioBlk
from pyvmm.devices.virtio.device import Status
from pyvmm.memory import GuestMemory

SECTORS = 128
IMG = SECTORS * 512
QSIZE = 32
DESC, AVAIL, USED, TABLES, BUF = 0x1000, 0x2000, 0x3000, 0x4000, 0x10000
SERIAL = b"fuzz-blk-serial-0123456789"[:20]
OK, IOERR, UNSUPP = 0, 1, 2
IN, OUT, FLUSH, GET_ID, DISCARD, WZ = 0, 1, 4, 8, 11, 13

MEM = GuestMemory(1 << 20)

sector_st = st.one_of(st.integers(0, SECTORS + 2), st.sampled_from([SECTORS - 1, SECTORS, (1 << 64) - 1, 1 << 55]),
                      st.integers(0, (1 << 64) - 1))
segment_st = st.tuples(st.one_of(st.integers(SECTORS - 8, SECTORS + 1), sector_st),
                       st.one_of(st.integers(0, 8), st.sampled_from([MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS + 1,
                                                                     0xFFFF_FFFF])),
                       st.one_of(st.sampled_from([0, 0, 1]), st.integers(0, 0xFFFF_FFFF)))

_segments = st.lists(segment_st, min_size=1, max_size=3)
_wild_segments = st.lists(segment_st, max_size=MAX_SEGMENTS + 1)

# Strategies are built once: building them inside the composite costs more than drawing from them.
_bool = st.booleans()
_rtype = st.one_of(st.sampled_from([IN, OUT, FLUSH, GET_ID, DISCARD, WZ]), st.integers(0, 0xFFFF_FFFF))
_near_end = st.one_of(st.integers(0, SECTORS + 1), st.integers(SECTORS - 4, SECTORS + 1))
_reserved = st.sampled_from([0, 0, 1, 0xFFFF_FFFF])
_header_len = st.sampled_from([16, 16, 0, 8, 15])
_tail = st.sampled_from([b"", b"x"])
_pattern = st.binary(min_size=1, max_size=4)
_sectors3 = st.integers(1, 3)
_sectors03 = st.integers(0, 3)
_wild_out = st.one_of(st.just(b""), st.binary(min_size=512, max_size=512), st.binary(max_size=700))
_id_len = st.sampled_from([19, 20, 21, 0, 512])
_wild_in = st.one_of(st.sampled_from([0, 512, 1024, 19, 20, 21]), st.integers(0, 1100))
_status_len = st.sampled_from([1, 1, 1, 0, 2, 5])
_cuts = st.lists(st.integers(0, 1 << 16), max_size=2)


@st.composite
def request(draw):
    """Half the requests are well formed for their type (so the data paths and the range checks at
    the end of the disk are reached often); the others have any shape at all."""
    wild = draw(_bool)
    rtype = draw(_rtype)
    sector = draw(sector_st if wild else _near_end)
    header = struct.pack("<IIQ", rtype, draw(_reserved), sector)
    if wild:
        header = header[:draw(_header_len)]
    if rtype in (DISCARD, WZ) and (not wild or draw(_bool)):
        segs = draw(_wild_segments if wild else _segments)
        out = b"".join(struct.pack("<QII", *s) for s in segs) + (draw(_tail) if wild else b"")
    elif rtype == OUT and not wild:
        out = draw(_pattern) * 128 * draw(_sectors3)
    elif wild:
        out = draw(_wild_out)
    else:
        out = b""
    if rtype == IN and not wild:
        in_len = 512 * draw(_sectors03)
    elif rtype == GET_ID and not wild:
        in_len = draw(_id_len)
    elif wild:
        in_len = draw(_wild_in)
    else:
        in_len = 0
    status_len = draw(_status_len) if wild else 1
    readable = header + out
    cuts_r = sorted(c % (len(readable) + 1) for c in draw(_cuts))
    cuts_w = sorted(c % (in_len + status_len + 1) for c in draw(_cuts))
    return readable, in_len + status_len, cuts_r, cuts_w, draw(_bool)


#: (requests, seed of the disk's initial contents, EVENT_IDX negotiated)
scenario = st.tuples(st.lists(request(), min_size=1, max_size=6), st.integers(0, 1 << 32), st.booleans())

def _pieces(total: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [0, *cuts, total]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]


def expect(disk: bytearray, readable: bytes, writable: bytearray) -> int:
    """Apply one request to the model (``disk`` and the ``writable`` bytes); the used length."""
    if len(readable) < 16 or len(writable) < 1:
        return 0
    rtype, _res, sector = struct.unpack_from("<IIQ", readable)
    data_out = readable[16:]
    in_len = len(writable) - 1

    def in_range(s: int, length: int) -> bool:
        return length % 512 == 0 and s + length // 512 <= SECTORS

    written, status = 0, UNSUPP
    if rtype == IN:
        status = IOERR
        if not data_out and in_range(sector, in_len):
            writable[:in_len] = disk[sector * 512:sector * 512 + in_len]
            status, written = OK, in_len
    elif rtype == OUT:
        status = IOERR
        if not in_len and in_range(sector, len(data_out)):
            disk[sector * 512:sector * 512 + len(data_out)] = data_out
            status = OK
    elif rtype == FLUSH:
        status = OK
    elif rtype == GET_ID:
        written = min(20, in_len)
        writable[:written] = SERIAL.ljust(20, b"\0")[:written]
        status = OK
    elif rtype in (DISCARD, WZ):
        count = len(data_out) // 16
        status = IOERR
        if 0 < count <= MAX_SEGMENTS and len(data_out) % 16 == 0:
            segs = [struct.unpack_from("<QII", data_out, 16 * i) for i in range(count)]
            status = OK
            for s, num, flags in segs:
                if num > MAX_DISCARD_SECTORS or not in_range(s, num * 512):
                    status = IOERR
                    break
                if flags & ~1 or (rtype == DISCARD and flags):
                    status = UNSUPP
                    break
            if status == OK:
                for s, num, _flags in segs:
                    disk[s * 512:(s + num) * 512] = bytes(num * 512)
    writable[-1] = status
    return written + 1


def run_scenario(sc, image: Path) -> None:
    requests, content_seed, event_idx = sc
    disk = bytearray(random.Random(content_seed).randbytes(IMG))
    image.write_bytes(disk)
    mem = MEM
    mem.fill(0, BUF + 0x10000, 0x5A)
    dev = VirtioBlk(mem, RawImage(str(image), locking="off"), serial=SERIAL.decode(), queue_size=QSIZE)
    try:
        dev.write_driver_features(0, (1 << 28) | (1 << 29 if event_idx else 0) | (1 << 9) | (1 << 13) | (1 << 14))
        dev.write_driver_features(1, 1)
        dev.set_status(int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK))
        q = dev.queues[0]
        q.size, q.desc_addr, q.avail_addr, q.used_addr = QSIZE, DESC, AVAIL, USED
        mem.fill(DESC, 0x3000 + 6 + 8 * QSIZE)
        assert dev.queue_ready(0)
        dev.set_status(int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK))

        nxt_buf, nxt_desc = BUF, 0
        posted = []   # (head, readable, writable gpa pieces)
        for k, (readable, wlen, cuts_r, cuts_w, indirect) in enumerate(requests):
            descs = []
            for off, n in _pieces(len(readable), cuts_r):
                mem.write(nxt_buf, readable[off:off + n])
                descs.append((nxt_buf, n, 0))
                nxt_buf += n + 16
            wpieces = []
            for _off, n in _pieces(wlen, cuts_w):
                descs.append((nxt_buf, n, 2))
                wpieces.append((nxt_buf, n))
                nxt_buf += n + 16
            if indirect or nxt_desc + len(descs) > QSIZE - 3:
                table = TABLES + 0x100 * k
                for i, (a, n, f) in enumerate(descs):
                    last = i == len(descs) - 1
                    mem.write(table + 16 * i, struct.pack("<QIHH", a, n, f | (0 if last else 1), 0 if last else i + 1))
                head = nxt_desc
                mem.write(DESC + 16 * head, struct.pack("<QIHH", table, 16 * len(descs), 4, 0))
                nxt_desc += 1
            else:
                head = nxt_desc
                for i, (a, n, f) in enumerate(descs):
                    last = i == len(descs) - 1
                    mem.write(DESC + 16 * (head + i),
                              struct.pack("<QIHH", a, n, f | (0 if last else 1), 0 if last else head + i + 1))
                nxt_desc += len(descs)
            mem.write_u16(AVAIL + 4 + 2 * k, head)
            posted.append((head, readable, wpieces))
        mem.write_u16(AVAIL + 2, len(requests))
        before = bytearray(mem.read(0, 1 << 20))
        expected = bytearray(before)
        expected_used = []
        for head, readable, wpieces in posted:
            writable = bytearray(b"".join(before[a:a + n] for a, n in wpieces))
            used_len = expect(disk, readable, writable)
            pos = 0
            for a, n in wpieces:
                expected[a:a + n] = writable[pos:pos + n]
                pos += n
            expected_used.append((head, used_len))

        dev.process_queue(0)

        assert not dev.status & Status.NEEDS_RESET, dev.broken_reason
        after = mem.read(0, 1 << 20)
        got_used = [struct.unpack_from("<II", after, USED + 4 + 8 * i) for i in range(len(posted))]
        assert struct.unpack_from("<H", after, USED + 2)[0] == len(posted)
        assert got_used == expected_used
        expected[USED:USED + 6 + 8 * QSIZE] = after[USED:USED + 6 + 8 * QSIZE]
        if expected != after:
            bad = [i for i in range(len(after)) if after[i] != expected[i]]
            raise AssertionError(f"guest memory differs from the model at {[hex(b) for b in bad[:8]]} "
                                 f"({len(bad)} bytes)")
        assert image.read_bytes() == disk, "the image differs from the model"

        # the device still answers: one more GET_ID
        k = len(posted)
        mem.write(BUF, struct.pack("<IIQ", GET_ID, 0, 0))
        mem.write(DESC + 16 * nxt_desc, struct.pack("<QIHH", BUF, 16, 1, nxt_desc + 1))
        mem.write(DESC + 16 * (nxt_desc + 1), struct.pack("<QIHH", BUF + 64, 21, 2, 0))
        mem.write_u16(AVAIL + 4 + 2 * k, nxt_desc)
        mem.write_u16(AVAIL + 2, k + 1)
        dev.process_queue(0)
        assert mem.read(BUF + 64, 21) == SERIAL.ljust(20, b"\0") + b"\0"
        assert mem.read_u16(USED + 2) == k + 1
    finally:
        dev.close()


def test_fuzz_virtio_blk_requests(fuzz, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    fuzz.run("virtio-blk-requests", scenario, lambda sc: run_scenario(sc, image))
