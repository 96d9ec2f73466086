"""bzImage payload unpacking (vmlinux) and PVH entry discovery."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm.guestkit import default_guest
from pyvmm.guestkit.errors import GuestKitError
from pyvmm.guestkit.vmlinux import (
    bzimage_payload,
    decompress_payload,
    extract_vmlinux,
    payload_format,
    pvh_entry,
    vmlinux_for,
)

FAKE_ELF = b"\x7fELF" + bytes(range(256)) * 40


def make_bzimage(payload: bytes, setup_sects: int = 3, payload_offset: int = 0x30) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    return bytes(setup) + b"\0" * payload_offset + payload + b"\0" * 64


def _with_size(stream: bytes, plain: bytes) -> bytes:
    return stream + struct.pack("<I", len(plain))


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("gzip", lambda d: gzip.compress(d, mtime=0)),
        ("xz", lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
        ("lzma", lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)),
    ],
)
def test_stdlib_codecs_round_trip(tmp_path: Path, name: str, compress) -> None:
    image = make_bzimage(_with_size(compress(FAKE_ELF), FAKE_ELF))
    payload = bzimage_payload(image)
    assert payload_format(payload) == name
    assert decompress_payload(payload) == FAKE_ELF
    src = tmp_path / "bzImage"
    src.write_bytes(image)
    assert extract_vmlinux(src, tmp_path / "vmlinux").read_bytes() == FAKE_ELF


def test_lz4_legacy_via_cli() -> None:
    lz4 = shutil.which("lz4")
    assert lz4, "lz4 is needed (Debian kernels are lz4-compressed): apt-get install lz4"
    stream = subprocess.run([lz4, "-l", "-c"], input=FAKE_ELF, capture_output=True, check=True).stdout
    payload = bzimage_payload(make_bzimage(_with_size(stream, FAKE_ELF)))
    assert payload_format(payload) == "lz4"
    assert decompress_payload(payload) == FAKE_ELF


def test_bad_images() -> None:
    with pytest.raises(GuestKitError, match="HdrS"):
        bzimage_payload(b"\0" * 4096)
    image = bytearray(make_bzimage(gzip.compress(FAKE_ELF)))
    struct.pack_into("<I", image, 0x24C, 10**8)
    with pytest.raises(GuestKitError, match="outside the file"):
        bzimage_payload(bytes(image))
    with pytest.raises(GuestKitError, match="unknown kernel compression"):
        decompress_payload(b"\x00\x01\x02\x03rest")
    with pytest.raises(GuestKitError, match="corrupt gzip"):
        decompress_payload(b"\x1f\x8b" + b"\xff" * 100)
    with pytest.raises(GuestKitError, match="not an ELF"):
        decompress_payload(_with_size(gzip.compress(b"plain text"), b"plain text"))


def test_real_kernel_vmlinux_has_pvh_entry() -> None:
    guest = default_guest()
    assert guest.kernel_info is not None
    path = vmlinux_for(guest.kernel_info)
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # ELF64
    entry = pvh_entry(path)
    assert entry is not None and 0x100000 <= entry < 0x10000000, hex(entry or 0)
    assert vmlinux_for(guest.kernel_info) == path  # cached


def test_pvh_entry_absent(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed for this test"
    src = tmp_path / "m.c"
    src.write_text("int main(void) { return 0; }\n")
    exe = tmp_path / "m"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True)
    assert pvh_entry(exe) is None
    with pytest.raises(GuestKitError, match="not a valid ELF"):
        pvh_entry(b"garbage bytes, not elf")
