"""qcow2 under a guest-like write load, checked without a guest.

The persistence test (boot, mke2fs, 64 MiB of ``dd bs=1M``, reboot, checksum) drives the
back-end with many-segment writes (one 4 KiB page per segment), writes that span many
clusters and L2 tables, write-zeroes and discards mixed in.  This replays such a load
through :class:`Qcow2Image` on images made by ``qemu-img create`` (default 64 KiB clusters,
and 4 KiB / 512 B clusters, where one L2 table covers only 2 MiB / 32 KiB so 1 MiB requests
cross L2 boundaries and allocate L2 tables and refcount blocks in the middle of a request),
then compares a model of the disk with what our code reads back (before and after reopening)
and with ``qemu-img convert -O raw``, and requires ``qemu-img check`` to be clean.
"""

from __future__ import annotations

import random

import pytest
from test_block_qcow2 import qemu_img

from pyvmm.block.qcow2 import Qcow2Image

MIB = 1 << 20
PAGE = 4096


def paged_iov(data: bytes, rng: random.Random) -> list[memoryview]:
    """``data`` as scattered page-sized segments (and a few odd sizes), like a guest's bio."""
    sizes: list[int] = []
    left = len(data)
    while left:
        n = min(rng.choice((PAGE, PAGE, PAGE, 512, 2 * PAGE)), left)
        sizes.append(n)
        left -= n
    slot = 2 * PAGE
    arena = bytearray(len(sizes) * 2 * slot)
    slots = list(range(0, len(arena), slot))
    rng.shuffle(slots)
    views: list[memoryview] = []
    pos = 0
    for n in sizes:
        start = slots.pop()
        v = memoryview(arena)[start:start + n]
        v[:] = data[pos:pos + n]
        views.append(v)
        pos += n
    return views


def first_difference(a: bytes, b: bytes, sector: int = 512) -> str:
    for off in range(0, min(len(a), len(b)), sector):
        if a[off:off + sector] != b[off:off + sector]:
            return f"first differing sector at byte {off:#x}"
    return f"lengths {len(a)} != {len(b)}" if len(a) != len(b) else "equal"


def read_all(img: Qcow2Image, size: int) -> bytes:
    buf = bytearray(size)
    mv = memoryview(buf)
    for off in range(0, size, MIB):
        img.readv([mv[off:off + MIB // 2], mv[off + MIB // 2:off + MIB]], off)
    return bytes(buf)


def guest_like_load(img: Qcow2Image, model: bytearray, rng: random.Random, size: int) -> None:
    # mke2fs-ish: scattered small metadata writes, zeroing, discards.
    for _ in range(40):
        length = rng.randrange(1, 16) * 512
        off = rng.randrange(0, (size - length) // 512) * 512
        data = rng.randbytes(length)
        img.writev(paged_iov(data, rng), off)
        model[off:off + length] = data
    for _ in range(6):
        length = rng.randrange(1, 600) * 512
        off = rng.randrange(0, (size - length) // 512) * 512
        img.write_zeroes(off, length, unmap=bool(rng.getrandbits(1)))
        model[off:off + length] = bytes(length)
        img.discard(off, length)  # advisory: the data may stay as it is (we keep zeroes)
    img.flush()  # clusters freed by discard/unmap may now be handed out again
    # dd bs=1M: long sequential runs of 1 MiB (and ragged) requests, some not cluster aligned.
    for start in (rng.randrange(0, size // 4) // 512 * 512, size // 3 // 512 * 512 + 3584):
        off = start
        while off + MIB <= size * 3 // 4 + start // 4:
            length = MIB if rng.random() < 0.8 else rng.randrange(1, 2048) * 512
            length = min(length, size - off)
            data = rng.randbytes(length)
            img.writev(paged_iov(data, rng), off)
            model[off:off + length] = data
            off += length
            if rng.random() < 0.1:
                probe = rng.randrange(0, size - 8192) // 512 * 512
                buf = bytearray(8192)
                img.readv([memoryview(buf)], probe)
                assert bytes(buf) == bytes(model[probe:probe + 8192]), f"stale read at {probe:#x}"
    # overwrites of already allocated data
    for _ in range(30):
        length = rng.randrange(1, 2048) * 512
        off = rng.randrange(0, (size - length) // 512) * 512
        data = rng.randbytes(length)
        img.writev(paged_iov(data, rng), off)
        model[off:off + length] = data


@pytest.mark.parametrize("cluster_size,size_mib,compat", [
    (65536, 96, "1.1"),
    (4096, 24, "1.1"),
    (4096, 24, "0.10"),
    (512, 6, "1.1"),
])
def test_guest_like_load_matches_qemu(tmp_path, cluster_size: int, size_mib: int, compat: str) -> None:
    size = size_mib * MIB
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size},compat={compat}",
             str(path), str(size))
    rng = random.Random(cluster_size * 31 + size_mib)
    model = bytearray(size)
    img = Qcow2Image(str(path))
    try:
        guest_like_load(img, model, rng, size)
        for _ in range(40):  # readahead-like reads: many scattered segments, any alignment
            length = rng.randrange(1, 2048) * 512
            off = rng.randrange(0, (size - length) // 512) * 512
            iov = paged_iov(bytes(length), rng)
            img.readv(iov, off)
            got = b"".join(bytes(v) for v in iov)
            assert got == bytes(model[off:off + length]), f"scattered read at {off:#x}+{length:#x}"
        ours = read_all(img, size)
        assert ours == bytes(model), "read back through our code: " + first_difference(ours, bytes(model))
        img.flush()
    finally:
        img.close()
    out = qemu_img("check", str(path))
    assert "No errors were found" in out, out
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-O", "raw", str(path), str(raw))
    theirs = raw.read_bytes()
    assert theirs == bytes(model), "qemu-img convert: " + first_difference(theirs, bytes(model))
    img = Qcow2Image(str(path), read_only=True)
    try:
        again = read_all(img, size)
    finally:
        img.close()
    assert again == bytes(model), "after reopening: " + first_difference(again, bytes(model))
