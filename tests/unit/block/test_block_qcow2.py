"""qcow2 back-end checked against QEMU's own tools (Debian qemu-utils).

Images are made by ``qemu-img create``/``convert``/``qemu-io``; after writing through
:class:`Qcow2Image` the result must pass ``qemu-img check`` and ``qemu-img convert -O raw``
must equal a model of what was written.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess

import pytest

from pyvmm.block import BlockError, open_image
from pyvmm.block.qcow2 import Qcow2Image

MIB = 1 << 20


def qemu_img(*args: str) -> str:
    exe = shutil.which("qemu-img")
    assert exe, "qemu-img is missing: apt-get install qemu-utils"
    r = subprocess.run([exe, *args], capture_output=True, text=True)
    assert r.returncode == 0, f"qemu-img {' '.join(args)} failed: {r.stderr or r.stdout}"
    return r.stdout


def check(path) -> None:
    out = qemu_img("check", str(path))
    assert "No errors were found" in out, out


def to_raw(path, tmp_path) -> bytes:
    out = tmp_path / "converted.raw"
    qemu_img("convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def write(img: Qcow2Image, model: bytearray | None, offset: int, data: bytes) -> None:
    buf = bytearray(data)
    # split into several views, as guest buffers would be
    cut = len(buf) // 3
    mv = memoryview(buf)
    img.writev([mv[:cut], mv[cut:]], offset)
    if model is not None:
        model[offset:offset + len(data)] = data


def read(img: Qcow2Image, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    mv = memoryview(buf)
    img.readv([mv[:length // 2], mv[length // 2:]], offset)
    return bytes(buf)


def random_writes(img, model, size, rng, count=60, max_len=200_000):
    for _ in range(count):
        length = rng.randrange(1, max_len // 512) * 512
        offset = rng.randrange(0, (size - length) // 512) * 512
        write(img, model, offset, rng.randbytes(length))


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_write_fresh_image_passes_qemu_check(tmp_path, compat):
    path = tmp_path / "a.qcow2"
    size = 32 * MIB
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", str(path), str(size))
    rng = random.Random(1)
    model = bytearray(size)
    img = Qcow2Image(str(path))
    assert img.size == size and img.version == (3 if compat == "1.1" else 2)
    random_writes(img, model, size, rng)
    # read back through our code too (mixed allocated/unallocated)
    for _ in range(20):
        off = rng.randrange(0, size - 70000)
        assert read(img, off, 65536) == bytes(model[off:off + 65536])
    img.close()
    check(path)
    assert to_raw(path, tmp_path) == bytes(model)


def test_read_image_written_by_qemu(tmp_path):
    raw = tmp_path / "src.raw"
    data = bytearray(os.urandom(8 * MIB))
    data[MIB:3 * MIB] = bytes(2 * MIB)  # a hole qemu-img will leave unallocated
    raw.write_bytes(data)
    path = tmp_path / "b.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 4M 128k", str(path)], check=True, capture_output=True)
    data[4 * MIB:4 * MIB + 128 * 1024] = bytes(128 * 1024)
    img = open_image(str(path), None, read_only=True)
    assert isinstance(img, Qcow2Image)
    got = read(img, 0, 8 * MIB)  # type: ignore[arg-type]
    img.close()
    assert got == bytes(data)


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
def test_backing_file_copy_on_write(tmp_path, backing_fmt):
    size = 16 * MIB
    base_data = os.urandom(12 * MIB)  # backing smaller than the overlay: the rest reads as zero
    base_raw = tmp_path / "base.raw"
    base_raw.write_bytes(base_data)
    base = base_raw
    if backing_fmt == "qcow2":
        base = tmp_path / "base.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(base_raw), str(base))
    before = base.read_bytes()
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", backing_fmt, str(overlay), str(size))
    model = bytearray(base_data) + bytearray(size - len(base_data))
    img = Qcow2Image(str(overlay))
    assert img.backing is not None and img.backing.read_only
    assert read(img, 5 * MIB + 7, 1000) == bytes(model[5 * MIB + 7:5 * MIB + 1007])
    rng = random.Random(2)
    # partial-cluster writes force copy-on-write from the backing file
    for _ in range(40):
        off = rng.randrange(0, size - 5000)
        write(img, model, off, rng.randbytes(rng.randrange(1, 5000)))
    random_writes(img, model, size, rng, count=20)
    img.write_zeroes(2 * MIB, 256 * 1024, unmap=False)  # whole clusters: zero flag over backing data
    model[2 * MIB:2 * MIB + 256 * 1024] = bytes(256 * 1024)
    img.write_zeroes(3 * MIB + 512, 1024, unmap=True)  # partial: written as zeroes
    model[3 * MIB + 512:3 * MIB + 1536] = bytes(1024)
    assert read(img, 0, size) == bytes(model)
    img.close()
    check(overlay)
    assert to_raw(overlay, tmp_path) == bytes(model)
    assert base.read_bytes() == before  # backing file untouched


def test_small_clusters_grow_refcount_table(tmp_path):
    """512-byte clusters: the refcount table (one cluster) covers 8 MiB of file; write more."""
    path = tmp_path / "small.qcow2"
    size = 24 * MIB
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), str(size))
    img = Qcow2Image(str(path))
    old_rt = img.rt_offset
    model = bytearray(size)
    chunk = os.urandom(MIB)
    for i in range(12):
        write(img, model, i * 2 * MIB, chunk)
    assert img.rt_offset != old_rt  # the table moved
    img.close()
    check(path)
    assert to_raw(path, tmp_path) == bytes(model)


def test_refcount_order_8_and_64(tmp_path):
    for bits in (8, 64):
        path = tmp_path / f"r{bits}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits}", str(path), str(8 * MIB))
        model = bytearray(8 * MIB)
        img = Qcow2Image(str(path))
        random_writes(img, model, 8 * MIB, random.Random(bits), count=20)
        img.close()
        check(path)
        assert to_raw(path, tmp_path) == bytes(model)


def test_reopen_after_writes(tmp_path):
    path = tmp_path / "re.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(8 * MIB))
    model = bytearray(8 * MIB)
    rng = random.Random(3)
    for _ in range(3):
        img = Qcow2Image(str(path))
        random_writes(img, model, 8 * MIB, rng, count=10)
        img.close()
    img = Qcow2Image(str(path), read_only=True)
    assert read(img, 0, 8 * MIB) == bytes(model)
    with pytest.raises(BlockError, match="read-only"):
        write(img, None, 0, b"x" * 512)
    img.close()
    check(path)


def test_compressed_image_rejected(tmp_path):
    raw = tmp_path / "c.raw"
    raw.write_bytes(b"compress me " * 100_000)
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    with pytest.raises(BlockError, match="compressed clusters are not supported"):
        Qcow2Image(str(path), read_only=True)


def test_encrypted_and_bad_headers_rejected(tmp_path):
    path = tmp_path / "e.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(MIB))
    blob = bytearray(path.read_bytes())
    cases = {
        "encrypted": (32, struct.pack(">I", 1)),
        "version 4": (4, struct.pack(">I", 4)),
        "cluster_bits": (20, struct.pack(">I", 30)),
        "dirty": (72, struct.pack(">Q", 1)),
        "unknown incompatible": (72, struct.pack(">Q", 1 << 40)),
        "bad magic": (0, b"QFI\x00"),
    }
    for what, (off, patch) in cases.items():
        bad = bytearray(blob)
        bad[off:off + len(patch)] = patch
        p = tmp_path / "bad.qcow2"
        p.write_bytes(bad)
        with pytest.raises(BlockError) as ei:
            open_image(str(p), "qcow2")
        assert "\n" not in str(ei.value), what


def test_missing_backing_file(tmp_path):
    base = tmp_path / "gone.raw"
    base.write_bytes(bytes(MIB))
    ov = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.raw", "-F", "raw", str(ov), str(MIB))
    base.unlink()
    with pytest.raises(BlockError, match="backing file gone.raw not found"):
        Qcow2Image(str(ov))


def test_probe_and_raw_backend(tmp_path):
    raw = tmp_path / "p.raw"
    raw.write_bytes(os.urandom(MIB))
    q = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), str(MIB))
    a = open_image(str(raw), None)
    b = open_image(str(q), None)
    assert type(a).__name__ == "RawImage" and type(b).__name__ == "Qcow2Image"
    a.close()
    b.close()
    with pytest.raises(BlockError, match="unsupported image format"):
        open_image(str(raw), "vmdk")
    with pytest.raises(BlockError, match="no such file"):
        open_image(str(tmp_path / "nope"), "raw")


def test_internal_snapshot_image_read_only(tmp_path):
    path = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(4 * MIB))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(path)], check=True,
                   capture_output=True)
    qemu_img("snapshot", "-c", "s1", str(path))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 4k", str(path)], check=True,
                   capture_output=True)
    with pytest.raises(BlockError, match="snapshots can only be opened read-only"):
        Qcow2Image(str(path))
    img = Qcow2Image(str(path), read_only=True)
    data = read(img, 0, 65536)
    img.close()
    assert data == b"\x22" * 4096 + b"\x11" * (65536 - 4096)


def test_lazy_refcounts_image_written(tmp_path):
    path = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), str(8 * MIB))
    model = bytearray(8 * MIB)
    img = Qcow2Image(str(path))
    random_writes(img, model, 8 * MIB, random.Random(9), count=15)
    img.close()
    check(path)
    assert to_raw(path, tmp_path) == bytes(model)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_discard_frees_clusters_and_reuses_them_after_a_flush(tmp_path, compat):
    cs, size = 65536, 16 * MIB
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},compat={compat}", str(path), str(size))
    model = bytearray(size)
    img = Qcow2Image(str(path))
    write(img, model, 0, os.urandom(4 * MIB))
    img.flush()
    blocks_before = os.stat(path).st_blocks
    # whole clusters [1 MiB, 2 MiB) go; the 512 bytes of a partial cluster after them stay
    img.discard(1 * MIB, 1 * MIB + 512)
    model[1 * MIB:2 * MIB] = bytes(MIB)
    assert read(img, 0, 4 * MIB) == bytes(model[:4 * MIB])
    freed = (blocks_before - os.stat(path).st_blocks) * 512
    assert freed >= MIB - cs, f"only {freed} bytes of the host file were released"  # (metadata pages may come and go)
    # not reused before a flush (the L2 update must be on disk first) ...
    end_before = os.stat(path).st_size
    write(img, model, 8 * MIB, os.urandom(cs))
    assert os.stat(path).st_size == end_before + cs
    img.flush()
    # ... and reused after it: 1 MiB of new data does not grow the file
    end_before = os.stat(path).st_size
    write(img, model, 10 * MIB, os.urandom(MIB))
    assert os.stat(path).st_size == end_before
    # write-zeroes with unmap frees too
    img.write_zeroes(0, 2 * cs, unmap=True)
    model[0:2 * cs] = bytes(2 * cs)
    assert read(img, 0, size) == bytes(model)
    img.close()
    check(path)
    assert to_raw(path, tmp_path) == bytes(model)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_discard_over_a_backing_file(tmp_path, compat):
    """v3 discards to zero clusters (the backing data must not show through); v2 has no zero
    clusters, so it keeps the overlay's data."""
    size = 4 * MIB
    base = tmp_path / "base.raw"
    base_data = os.urandom(size)
    base.write_bytes(base_data)
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-b", base.name, "-F", "raw",
             str(overlay), str(size))
    model = bytearray(base_data)
    img = Qcow2Image(str(overlay))
    write(img, model, MIB, os.urandom(MIB))
    img.discard(MIB, MIB)
    if compat == "1.1":
        model[MIB:2 * MIB] = bytes(MIB)
    assert read(img, 0, size) == bytes(model)
    img.close()
    check(overlay)
    assert to_raw(overlay, tmp_path) == bytes(model)
