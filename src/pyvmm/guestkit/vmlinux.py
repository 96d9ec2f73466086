"""Unpack the ELF ``vmlinux`` inside a bzImage, and find its PVH entry point.

A bzImage is real-mode setup code followed by a compressed kernel that the
kernel's own decompressor unpacks at boot.  Under an emulated CPU that
decompression (and the real/protected-mode setup path) costs boot time; a VMM
can instead load the ELF ``vmlinux`` directly and enter it through the Xen
PVH entry (``XEN_ELFNOTE_PHYS32_ENTRY``) in 32-bit protected mode, as QEMU
and Firecracker do.  This module does the unpacking on the host, once, and
caches the result next to the kernel.

The payload's codec is recognised by its magic.  gzip, xz, lzma and bzip2
use the standard library; zstd uses the ``zstandard`` module or the ``zstd``
program; lz4 (Debian's choice) needs the ``lz4`` program (Debian package
``lz4``).
"""

from __future__ import annotations

import bz2
import io
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyvmm.guestkit.cache import atomic_output_file, cache_subdir
from pyvmm.guestkit.errors import GuestKitError
from pyvmm.guestkit.kernel import KernelInfo, check_bzimage

SETUP_SECTS_OFFSET = 0x1F1
VERSION_OFFSET = 0x206
PAYLOAD_OFFSET_OFFSET = 0x248
MIN_PROTOCOL_WITH_PAYLOAD = 0x208
XEN_ELFNOTE_PHYS32_ENTRY = 18

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x89LZO", "lzo"),
    (b"\x7fELF", "none"),
)


def bzimage_payload(image: bytes) -> bytes:
    """The compressed kernel embedded in a bzImage (boot protocol >= 2.08)."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise GuestKitError("not an x86 bzImage (no HdrS setup header)")
    (version,) = struct.unpack_from("<H", image, VERSION_OFFSET)
    if version < MIN_PROTOCOL_WITH_PAYLOAD:
        raise GuestKitError(f"boot protocol {version >> 8}.{version & 0xFF:02d} predates payload fields")
    setup_sects = image[SETUP_SECTS_OFFSET] or 4
    offset, length = struct.unpack_from("<II", image, PAYLOAD_OFFSET_OFFSET)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(image):
        raise GuestKitError("bzImage payload lies outside the file (truncated kernel?)")
    return image[start : start + length]


def payload_format(payload: bytes) -> str:
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    raise GuestKitError(f"unknown kernel compression (magic {payload[:4].hex()})")


def _run_tool(tool: str, payload: bytes, hint: str) -> bytes:
    path = shutil.which(tool)
    if path is None:
        raise GuestKitError(f"kernel payload is {hint}-compressed: install {tool} (Debian package '{tool}')")
    # The kernel appends the uncompressed size after the stream; the tools may
    # complain about those trailing bytes, so judge by the output instead.
    proc = subprocess.run([path, "-dc"], input=payload, capture_output=True, check=False)
    return proc.stdout


def decompress_payload(payload: bytes) -> bytes:
    """Decompress a bzImage payload to the vmlinux ELF bytes."""
    fmt = payload_format(payload)
    try:
        if fmt == "none":
            out = payload
        elif fmt == "gzip":
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        elif fmt == "xz":
            out = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
        elif fmt == "lzma":
            out = lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
        elif fmt == "bzip2":
            out = bz2.BZ2Decompressor().decompress(payload)
        elif fmt == "lz4":
            out = _lz4(payload)
        elif fmt == "zstd":
            out = _zstd(payload)
        else:
            raise GuestKitError(f"{fmt}-compressed kernels are not supported; use a gzip/xz/lz4/zstd kernel")
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise GuestKitError(f"corrupt {fmt} kernel payload: {exc}") from exc
    if fmt != "none" and len(payload) >= 4:
        (expected,) = struct.unpack_from("<I", payload, len(payload) - 4)
        if len(out) < expected and expected < 1 << 30:
            raise GuestKitError(f"kernel payload decompressed to {len(out)} bytes, expected {expected}")
        if len(out) > expected and fmt == "lz4":
            out = out[:expected]
    if not out.startswith(b"\x7fELF"):
        raise GuestKitError(f"decompressed {fmt} kernel payload is not an ELF vmlinux")
    return out


def _lz4(payload: bytes) -> bytes:
    # The kernel uses lz4's *legacy* frame format, which the Python bindings'
    # frame API does not read; the lz4 program does.
    return _run_tool("lz4", payload, "lz4")


def _zstd(payload: bytes) -> bytes:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        return _run_tool("zstd", payload, "zstd")
    return zstandard.ZstdDecompressor().decompressobj().decompress(payload)  # type: ignore[no-any-return]


def pvh_entry(vmlinux: Path | bytes) -> int | None:
    """The 32-bit PVH entry point from the ELF notes, or None if the kernel has none."""
    stream: BinaryIO
    if isinstance(vmlinux, bytes):
        stream = io.BytesIO(vmlinux)
    else:
        try:
            stream = open(vmlinux, "rb")  # noqa: SIM115
        except OSError as exc:
            raise GuestKitError(f"cannot read {vmlinux}: {exc.strerror}") from exc
    with stream:
        try:
            elf = ELFFile(stream)
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_NOTE":
                    continue
                # a PT_NOTE segment is a NoteSegment; pyelftools types iter_segments() as plain Segments
                for note in seg.iter_notes():  # type: ignore[attr-defined]
                    if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                        desc = note["n_descdata"]
                        raw = desc.encode("latin-1") if isinstance(desc, str) else bytes(desc)
                        return int.from_bytes(raw[:4], "little")
        except ELFError as exc:
            raise GuestKitError(f"vmlinux is not a valid ELF file: {exc}") from exc
    return None


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """Write the vmlinux ELF from ``bzimage`` to ``out`` (atomically)."""
    try:
        image = bzimage.read_bytes()
    except OSError as exc:
        raise GuestKitError(f"cannot read {bzimage}: {exc.strerror}") from exc
    data = decompress_payload(bzimage_payload(image))
    with atomic_output_file(out, mode=0o644) as tmp:
        tmp.write_bytes(data)
    return out


def vmlinux_for(kernel: KernelInfo) -> Path:
    """The cached vmlinux of ``kernel`` (unpacked on first use).

    Cached next to the bzImage for apt kernels; host kernels are keyed by release.
    """
    check_bzimage(kernel.vmlinuz)
    if kernel.source == "apt":
        out = kernel.vmlinuz.with_name("vmlinux")
    else:
        out = cache_subdir("vmlinux") / f"vmlinux-{kernel.release}"
    if out.is_file() and out.stat().st_mtime >= kernel.vmlinuz.stat().st_mtime:
        return out
    return extract_vmlinux(kernel.vmlinuz, out)
