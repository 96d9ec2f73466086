"""Safe format probing, backing chains, qcow2 overlap checks, and no write before the first one.

Each test here failed on main before issue 11's block work: a probed raw disk took a qcow2
header in sector 0, a backing loop raised RecursionError, a directory as backing file an
IsADirectoryError, a corrupt L1 let data land on the L1 table, and opening a qcow2 read-write
rewrote its header (clearing the autoclear bits) although nothing was ever written.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess

import pytest

from pyvmm.block import BlockError, open_image

QEMU_IMG = shutil.which("qemu-img")
MAX_BACKING_DEPTH = 64  # pyvmm.block.base.MAX_BACKING_DEPTH


def _img(*args: str) -> None:
    assert QEMU_IMG, "qemu-img is missing (Debian package qemu-utils)"
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


def _qcow2(path, backing=None, fmt="raw", size="1M") -> str:
    extra = ["-b", str(backing), "-F", fmt] if backing else []
    _img("create", "-q", "-f", "qcow2", *extra, str(path), size)
    return str(path)


def _qcow2_header(tmp_path, backing="/etc/passwd") -> bytes:
    """The first sector of a qcow2 image that names a host file as its backing file."""
    evil = _qcow2(tmp_path / "evil.qcow2", backing, "raw")
    return open(evil, "rb").read(512)


# -- probing ------------------------------------------------------------------------------------
def test_probed_raw_warns_as_qemu_and_refuses_a_qcow2_header_in_sector0(tmp_path, caplog):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    header = _qcow2_header(tmp_path)
    with caplog.at_level(logging.WARNING):
        img = open_image(str(disk), None)
    assert "Image format was not specified for" in caplog.text and "probing guessed raw" in caplog.text
    assert "write operations on block 0 will be restricted" in caplog.text
    try:
        with pytest.raises(BlockError, match="write to sector 0 refused.*probe as qcow2"):
            img.writev([memoryview(bytearray(header))], 0)
        # a piece of it, laid over what is there, is judged as the whole sector would be
        with pytest.raises(BlockError, match="sector 0 refused"):
            img.writev([memoryview(bytearray(header[:8]))], 0)
        img.writev([memoryview(bytearray(b"\x55\xaa" * 256))], 0)  # an ordinary boot sector is fine
        img.writev([memoryview(bytearray(header))], 4096)        # elsewhere, anything goes
    finally:
        img.close()
    assert open(disk, "rb").read(2) == b"\x55\xaa"
    assert open_image(str(disk), None, read_only=True).close() is None  # still probes as raw


@pytest.mark.parametrize("magic", [b"QED\0", b"conectix", b"vhdxfile", b"KDMV", b"LUKS\xba\xbe"])
def test_probed_raw_refuses_other_formats_magics(tmp_path, magic):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 16))
    img = open_image(str(disk), None)
    try:
        with pytest.raises(BlockError, match="sector 0 refused"):
            img.writev([memoryview(bytearray(magic.ljust(512, b"\0")))], 0)
    finally:
        img.close()
    assert open(disk, "rb").read(512) == bytes(512)


def test_explicit_raw_takes_any_sector0(tmp_path, caplog):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    with caplog.at_level(logging.WARNING):
        img = open_image(str(disk), "raw")
    assert "probing" not in caplog.text
    header = _qcow2_header(tmp_path)
    img.writev([memoryview(bytearray(header))], 0)
    img.close()
    assert open(disk, "rb").read(512) == header


# -- backing chains -----------------------------------------------------------------------------
def test_self_backing_loop_is_one_line_not_a_recursion_error(tmp_path):
    me = _qcow2(tmp_path / "me.qcow2")
    _img("rebase", "-u", "-f", "qcow2", "-b", me, "-F", "qcow2", me)
    with pytest.raises(BlockError, match="loop") as e:
        open_image(me, "qcow2", read_only=True)
    assert "\n" not in str(e.value)


def test_two_image_backing_loop(tmp_path):
    a = _qcow2(tmp_path / "a.qcow2")
    b = _qcow2(tmp_path / "b.qcow2", a, "qcow2")
    _img("rebase", "-u", "-f", "qcow2", "-b", b, "-F", "qcow2", a)
    with pytest.raises(BlockError, match="loop"):
        open_image(b, "qcow2")
    with pytest.raises(BlockError, match="loop"):
        open_image(a, None, read_only=True)


def test_backing_file_that_is_a_directory_or_missing(tmp_path):
    (tmp_path / "dir").mkdir()
    ov = _qcow2(tmp_path / "ov.qcow2")
    _img("rebase", "-u", "-f", "qcow2", "-b", str(tmp_path / "dir"), "-F", "raw", ov)
    with pytest.raises(BlockError, match="is a directory"):
        open_image(ov, "qcow2")
    _img("rebase", "-u", "-f", "qcow2", "-b", str(tmp_path / "gone.raw"), "-F", "raw", ov)
    with pytest.raises(BlockError, match="backing file .*gone.raw not found"):
        open_image(ov, "qcow2")
    with pytest.raises(BlockError, match="is a directory"):
        open_image(str(tmp_path / "dir"), None, read_only=True)
    with pytest.raises(BlockError, match="is a directory"):
        open_image(str(tmp_path / "dir"), "raw", read_only=True)


def test_backing_chain_depth_is_bounded(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 16))
    prev, fmt = str(base), "raw"
    for i in range(MAX_BACKING_DEPTH + 1):
        prev, fmt = _qcow2(tmp_path / f"l{i}.qcow2", prev, fmt, size="64K"), "qcow2"
    with pytest.raises(BlockError, match=f"deeper than {MAX_BACKING_DEPTH}"):
        open_image(prev, "qcow2", read_only=True)
    open_image(str(tmp_path / f"l{MAX_BACKING_DEPTH - 2}.qcow2"), "qcow2", read_only=True).close()


# -- qcow2 overlap checks -----------------------------------------------------------------------
def _l1_points_at_l1(tmp_path) -> tuple[str, int]:
    """A qcow2 whose first L1 entry names the L1 table itself as its L2 table."""
    path = _qcow2(tmp_path / "bad.qcow2")
    with open(path, "r+b") as f:
        hdr = f.read(104)
        l1_offset = struct.unpack_from(">Q", hdr, 40)[0]
        f.seek(l1_offset)
        f.write(struct.pack(">Q", l1_offset | 1 << 63))
    return path, l1_offset


def test_data_never_lands_on_the_l1_table(tmp_path, caplog):
    path, l1_offset = _l1_points_at_l1(tmp_path)
    l1_before = open(path, "rb").read()[l1_offset:l1_offset + 4096]
    img = open_image(path, "qcow2")
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(BlockError, match="active L1 table.*marked corrupt"):
            img.writev([memoryview(bytearray(b"\xee" * 512))], 0)
        assert "Marking image as corrupt" in caplog.text
        with pytest.raises(BlockError, match="marked corrupt"):  # and no further writes at all
            img.writev([memoryview(bytearray(b"\xee" * 512))], 1 << 19)
    finally:
        img.close()
    data = open(path, "rb").read()
    assert data[l1_offset:l1_offset + 4096] == l1_before
    assert struct.unpack_from(">Q", data, 72)[0] & 2, "the corrupt bit is set, as QEMU sets it"
    with pytest.raises(BlockError, match="marked corrupt"):
        open_image(path, "qcow2")


def test_l2_entry_pointing_at_a_refcount_block_is_refused(tmp_path):
    path = _qcow2(tmp_path / "q.qcow2")
    img = open_image(path, "qcow2")
    img.writev([memoryview(bytearray(b"\x11" * 512))], 0)  # allocates an L2 table and a data cluster
    img.close()
    with open(path, "r+b") as f:
        hdr = f.read(104)
        l1_offset, rt_offset = struct.unpack_from(">Q", hdr, 40)[0], struct.unpack_from(">Q", hdr, 48)[0]
        f.seek(rt_offset)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
        f.seek(l2)
        f.write(struct.pack(">Q", rb | 1 << 63))
    before = open(path, "rb").read()[rb:rb + 65536]
    img = open_image(path, "qcow2")
    try:
        with pytest.raises(BlockError, match="refcount block"):
            img.writev([memoryview(bytearray(b"\x22" * 512))], 0)
        with pytest.raises(BlockError, match="marked corrupt"):
            img.discard(0, 65536)
    finally:
        img.close()
    assert open(path, "rb").read()[rb:rb + 65536] == before


# -- nothing written before the first write -----------------------------------------------------
def _with_autoclear(tmp_path) -> str:
    path = _qcow2(tmp_path / "ac.qcow2")
    with open(path, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 1))  # the bitmaps autoclear bit
    return path


def test_open_and_close_without_a_write_leaves_the_image_as_it_was(tmp_path):
    path = _with_autoclear(tmp_path)
    before, mtime = open(path, "rb").read(), os.stat(path).st_mtime_ns
    img = open_image(path, "qcow2")
    buf = bytearray(4096)
    img.readv([memoryview(buf)], 0)
    img.flush()
    img.close()
    assert open(path, "rb").read() == before
    assert os.stat(path).st_mtime_ns == mtime


def test_the_first_write_clears_autoclear(tmp_path):
    path = _with_autoclear(tmp_path)
    img = open_image(path, "qcow2")
    img.writev([memoryview(bytearray(512))], 0)
    img.close()
    assert struct.unpack_from(">Q", open(path, "rb").read(96), 88)[0] == 0
    _img("check", "-q", path)


def test_a_refused_open_writes_nothing(tmp_path):
    path = _with_autoclear(tmp_path)
    holder = open_image(path, "qcow2", read_only=True)
    before = open(path, "rb").read()
    try:
        with pytest.raises(BlockError, match='Failed to get "write" lock'):
            open_image(path, "qcow2")
    finally:
        holder.close()
    assert open(path, "rb").read() == before


def test_the_depth_bound_is_pyvmms():
    from pyvmm.block.base import MAX_BACKING_DEPTH as bound

    assert bound == MAX_BACKING_DEPTH
