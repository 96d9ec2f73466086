"""Image locks as QEMU's file-posix takes them (pyvmm.block.lock), seen through /proc/locks.

Byte 100+N: permission N held; byte 200+N: permission N not shared (0 consistent read, 1 write,
3 resize).  The expected sets are the ones QEMU 7.2 takes for a virtio-blk with the same options;
tests/system/test_image_locking_qemu.py checks them against a running QEMU.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from pyvmm.block import BlockError, open_image
from support.locks import locked_bytes

QEMU_IMG = shutil.which("qemu-img")


def _qcow2(path, backing=None, fmt="raw") -> str:
    assert QEMU_IMG, "qemu-img is missing (Debian package qemu-utils)"
    cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", str(backing), "-F", fmt]
    subprocess.run([*cmd, str(path), "1M"], check=True)
    return str(path)


def _raw(path) -> str:
    path.write_bytes(bytes(1 << 20))
    return str(path)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("fmt,read_only,share_rw,expected", [
    ("raw", False, False, {100, 101, 201}),
    ("raw", True, False, {100, 201}),
    ("raw", False, True, {100, 101}),
    ("raw", True, True, {100}),
    ("qcow2", False, False, {100, 101, 103, 201, 203}),
    ("qcow2", True, False, {100, 201, 203}),
    ("qcow2", False, True, {100, 101, 103, 201, 203}),  # qcow2 metadata is never shared for writing
])
def test_lock_bytes_are_qemus(tmp_path, fmt, read_only, share_rw, expected):
    path = _raw(tmp_path / "d.img") if fmt == "raw" else _qcow2(tmp_path / "d.qcow2")
    img = open_image(path, fmt, read_only=read_only, share_rw=share_rw)
    try:
        assert locked_bytes(path) == expected
    finally:
        img.close()
    assert locked_bytes(path) == set()  # closing drops them


@pytest.mark.parametrize("share_rw,backing_expected", [(False, {100, 201, 203}), (True, {100})])
def test_backing_file_is_locked_shared_and_read_only(tmp_path, share_rw, backing_expected):
    base = _raw(tmp_path / "base.raw")
    ov = _qcow2(tmp_path / "ov.qcow2", base)
    img = open_image(ov, "qcow2", share_rw=share_rw)
    try:
        assert locked_bytes(base) == backing_expected
        assert locked_bytes(ov) == {100, 101, 103, 201, 203}
        assert img.backing is not None and img.backing.read_only
        # a second overlay on the same backing file: readers share it
        ov2 = _qcow2(tmp_path / "ov2.qcow2", base)
        open_image(ov2, "qcow2").close()
        if share_rw:  # as QEMU: a user that shares writes lets its backing file be written too
            open_image(base, "raw", share_rw=True).close()
        else:  # nobody may write the backing file under the overlays
            with pytest.raises(BlockError, match='Failed to get "write" lock'):
                open_image(base, "raw", share_rw=True)
    finally:
        img.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_second_writer_in_one_process_is_refused_and_the_image_untouched(tmp_path, fmt):
    path = _raw(tmp_path / "d.img") if fmt == "raw" else _qcow2(tmp_path / "d.qcow2")
    first = open_image(path, fmt)
    before = _digest(path)
    try:
        with pytest.raises(BlockError) as e:
            open_image(path, fmt)
        assert str(e.value) == f'Failed to get "write" lock: Is another process using the image [{path}]?'
        assert "\n" not in str(e.value)
        assert locked_bytes(path) == ({100, 101, 201} if fmt == "raw" else {100, 101, 103, 201, 203})
        # a reader is refused too: the writer does not share... and the reader does not share writes
        with pytest.raises(BlockError, match='Failed to get shared "write" lock'):
            open_image(path, fmt, read_only=True)
    finally:
        first.close()
    assert _digest(path) == before
    open_image(path, fmt).close()  # the lock went with the first image


def test_two_readers_share_and_a_writer_waits_for_both(tmp_path):
    path = _raw(tmp_path / "d.img")
    a = open_image(path, "raw", read_only=True)
    b = open_image(path, "raw", read_only=True)
    with pytest.raises(BlockError, match='Failed to get "write" lock'):
        open_image(path, "raw")
    a.close()
    with pytest.raises(BlockError, match='Failed to get "write" lock'):
        open_image(path, "raw")
    b.close()
    open_image(path, "raw").close()


def test_share_rw_on_both_sides_lets_two_raw_writers_in(tmp_path):
    path = _raw(tmp_path / "d.img")
    a = open_image(path, "raw", share_rw=True)
    b = open_image(path, "raw", share_rw=True)
    try:  # one without share-rw=on is still refused: it will not share with them
        with pytest.raises(BlockError, match='Failed to get shared "write" lock'):
            open_image(path, "raw")
    finally:
        a.close()
        b.close()


def test_locking_off_takes_and_checks_nothing(tmp_path):
    path = _raw(tmp_path / "d.img")
    holder = open_image(path, "raw")
    try:
        free = open_image(path, "raw", locking="off")
        assert locked_bytes(path) == {100, 101, 201}  # only the holder's
        free.close()
        with pytest.raises(BlockError, match='Failed to get "write" lock'):
            open_image(path, "raw", locking="on")
    finally:
        holder.close()
    with pytest.raises(BlockError, match="locking=maybe"):
        open_image(path, "raw", locking="maybe")


def test_a_failed_set_perm_keeps_what_was_held(tmp_path):
    from pyvmm.block.lock import PERM_ALL, ImageLock, Perm

    path = _raw(tmp_path / "d.img")
    other = open_image(path, "raw", read_only=True)
    fd = open(path, "rb")
    try:
        lock = ImageLock(fd.fileno(), path)
        lock.set_perm(Perm.CONSISTENT_READ, PERM_ALL)
        assert locked_bytes(path) == {100, 201}  # the other's and ours merge
        with pytest.raises(BlockError, match='Failed to get "write" lock'):
            lock.set_perm(Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ)
        assert lock.locked_bytes() == [100]
    finally:
        fd.close()
        other.close()
