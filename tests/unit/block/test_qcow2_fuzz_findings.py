"""Regressions for what the qcow2 fuzz target (tests/unit/fuzz/test_fuzz_qcow2.py) found.

Each image is a qemu-img image with one header field or table entry changed.  Before the fix,
pyvmm failed on them with ValueError (a 2**32-bit number formatted for the message), OverflowError
(an offset past what pread takes), OSError EFBIG (a refcount table "at" 2**56 written to), or
MemoryError (a refcount table grown to cover a data cluster "at" 2**56).  Now each is refused at
open with one BlockError line and the file is left as it was; ``qemu-img check`` on the same
image agrees that it is invalid or corrupt.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm.block import BlockError
from pyvmm.block.qcow2 import Qcow2Image

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def _tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} is missing: apt-get install qemu-utils"
    return exe


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("qcow2-base") / "base.qcow2"
    subprocess.run([_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), "4M"],
                   check=True)
    subprocess.run([_tool("qemu-io"), "-f", "qcow2", "-c", "write -P 0xab 0 64k", str(path)], check=True,
                   capture_output=True)
    return path.read_bytes()


def _l2(image: bytes) -> int:
    l1_offset = struct.unpack_from(">Q", image, 40)[0]
    return struct.unpack_from(">Q", image, l1_offset)[0] & OFFSET_MASK


CASES = {
    # name: (patches as (offset or callable(image) -> offset, bytes), words in pyvmm's error line)
    "refcount order 2**32-1": ([(96, struct.pack(">I", 0xFFFF_FFFF))], "refcount order 4294967295"),
    "L1 table at 2**63": ([(40, struct.pack(">Q", 1 << 63))], "L1 table"),
    "L1 table past the end": ([(40, struct.pack(">Q", 1 << 40))], "L1 table"),
    "refcount table at 2**56": ([(48, struct.pack(">Q", 0x0100_0000_0003_0000))], "refcount table"),
    "refcount block past the end": ([(lambda im: struct.unpack_from(">Q", im, 48)[0], struct.pack(">Q", 1 << 40))],
                                    "refcount block 0"),
    "L2 table past the end": ([(lambda im: struct.unpack_from(">Q", im, 40)[0],
                                struct.pack(">Q", (1 << 63) | (1 << 40)))], "L2 table 0"),
    "data cluster at 2**56 - 64 KiB": ([(_l2, struct.pack(">Q", (1 << 63) | 0x00FF_FFFF_FFFF_0000))],
                                       "data cluster"),
    "backing name outside the header cluster": ([(8, struct.pack(">QI", 0x20000, 8))], "backing file name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_image_is_refused_with_one_line_and_left_alone(case: str, base: bytes, tmp_path: Path) -> None:
    patches, words = CASES[case]
    image = bytearray(base)
    for where, data in patches:
        off = where(base) if callable(where) else where
        image[off:off + len(data)] = data
    path = tmp_path / "image.qcow2"
    path.write_bytes(image)
    for read_only in (False, True):
        with pytest.raises(BlockError) as exc:
            Qcow2Image(str(path), read_only=read_only, locking="off")
        line = str(exc.value)
        assert "\n" not in line and line.startswith(f"{path}: qcow2: ") and words in line, line
    assert path.read_bytes() == image, "a refused image must not be written"
    r = subprocess.run([_tool("qemu-img"), "check", str(path)], capture_output=True, text=True)
    assert r.returncode != 0, f"qemu-img check accepts the image:\n{r.stdout}{r.stderr}"


def test_the_unmodified_image_still_opens(base: bytes, tmp_path: Path) -> None:
    path = tmp_path / "image.qcow2"
    path.write_bytes(base)
    img = Qcow2Image(str(path), locking="off")
    try:
        buf = bytearray(4096)
        img.readv([memoryview(buf)], 0)
        assert buf == b"\xab" * 4096
    finally:
        img.close()
