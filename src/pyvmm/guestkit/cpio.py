"""A writer for cpio "newc" archives (SVR4 without CRC, magic ``070701``).

This is the format the Linux kernel unpacks as an initramfs
(Documentation/driver-api/early-userspace/buffer-format.rst).  Every entry is a
110-byte ASCII header of thirteen 8-digit hex fields, the NUL-terminated name
padded so header+name is a multiple of four bytes, then the data padded the
same way.  The archive ends with an entry named ``TRAILER!!!``.

All entries are owned by uid/gid 0 and carry a fixed mtime (0 by default), so
the same inputs always give the same bytes - the build cache relies on that.
The kernel's unpacker does not create missing parent directories, so the
writer adds them implicitly.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO

from pyvmm.guestkit.cache import atomic_output_file
from pyvmm.guestkit.errors import GuestKitError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
_FIELD_MAX = 0xFFFFFFFF


class NodeKind(IntEnum):
    """File-type bits of ``st_mode`` as cpio stores them."""

    DIRECTORY = stat.S_IFDIR
    REGULAR = stat.S_IFREG
    SYMLINK = stat.S_IFLNK
    CHAR_DEVICE = stat.S_IFCHR
    BLOCK_DEVICE = stat.S_IFBLK
    FIFO = stat.S_IFIFO


def _pad4(length: int) -> int:
    return (4 - length % 4) % 4


def _normalise(path: str) -> str:
    """Archive names are relative ("bin/sh", never "/bin/sh" or "./bin/sh")."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise GuestKitError(f"invalid cpio path {path!r}")
    return "/".join(parts)


@dataclass(frozen=True)
class CpioEntry:
    """One parsed entry; used by :func:`read_newc` (tests, inspection)."""

    name: str
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    data: bytes
    rdevmajor: int
    rdevminor: int

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


class CpioWriter:
    """Stream newc entries to a binary file object.

    Use as a context manager or call :meth:`close` to write the trailer; the
    underlying file object is not closed.
    """

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._next_ino = 1
        self._names: set[str] = set()
        self._dirs: set[str] = set()
        self._closed = False

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    # -- public entry points ------------------------------------------------

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = _normalise(path)
        if name in self._dirs:
            return
        self._ensure_parents(name)
        self._entry(name, NodeKind.DIRECTORY | (mode & 0o7777), b"", nlink=2)
        self._dirs.add(name)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = _normalise(path)
        self._ensure_parents(name)
        self._entry(name, NodeKind.REGULAR | (mode & 0o7777), data)

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise GuestKitError(f"symlink {path!r} has an empty target")
        name = _normalise(path)
        self._ensure_parents(name)
        self._entry(name, NodeKind.SYMLINK | 0o777, target.encode())

    def add_device(self, path: str, kind: NodeKind, major: int, minor: int, mode: int = 0o600) -> None:
        if kind not in (NodeKind.CHAR_DEVICE, NodeKind.BLOCK_DEVICE):
            raise GuestKitError(f"device {path!r}: kind must be CHAR_DEVICE or BLOCK_DEVICE")
        name = _normalise(path)
        self._ensure_parents(name)
        self._entry(name, kind | (mode & 0o7777), b"", rdev=(major, minor))

    def add_fifo(self, path: str, mode: int = 0o644) -> None:
        name = _normalise(path)
        self._ensure_parents(name)
        self._entry(name, NodeKind.FIFO | (mode & 0o7777), b"")

    def close(self) -> None:
        """Write the ``TRAILER!!!`` entry (once)."""
        if self._closed:
            return
        self._write_header(TRAILER, ino=0, mode=0, nlink=1, data=b"", rdev=(0, 0))
        self._closed = True

    # -- internals --------------------------------------------------------

    def _ensure_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self._dirs:
                self.add_dir(parent)

    def _entry(self, name: str, mode: int, data: bytes, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise GuestKitError("cpio archive already closed")
        if name in self._names:
            raise GuestKitError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        ino = self._next_ino
        self._next_ino += 1
        self._write_header(name, ino=ino, mode=mode, nlink=nlink, data=data, rdev=rdev)

    def _write_header(self, name: str, *, ino: int, mode: int, nlink: int, data: bytes, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            self._mtime,
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check (unused in 070701)
        )
        for value in fields:
            if not 0 <= value <= _FIELD_MAX:
                raise GuestKitError(f"cpio entry {name!r}: field value {value} out of range")
        header = MAGIC + b"".join(b"%08X" % v for v in fields)
        assert len(header) == HEADER_SIZE
        out = self._out
        out.write(header)
        out.write(encoded)
        out.write(b"\0" * _pad4(HEADER_SIZE + len(encoded)))
        if data:
            out.write(data)
            out.write(b"\0" * _pad4(len(data)))


def read_newc(blob: bytes) -> list[CpioEntry]:
    """Parse a newc archive (gzip-compressed or not) up to its trailer.

    Used to inspect built images and by the tests; raises GuestKitError on any
    malformed header so a corrupt archive is never half-accepted.
    """
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(blob):
            raise GuestKitError("cpio archive truncated (no TRAILER!!!)")
        header = blob[pos : pos + HEADER_SIZE]
        if header[:6] != MAGIC:
            raise GuestKitError(f"bad cpio magic {header[:6]!r} at offset {pos}")
        try:
            f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise GuestKitError(f"bad cpio header at offset {pos}") from exc
        ino, mode, uid, gid, nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, _check = f
        name_start = pos + HEADER_SIZE
        name_end = name_start + namesize
        if namesize == 0 or name_end > len(blob) or blob[name_end - 1] != 0:
            raise GuestKitError(f"bad cpio name at offset {pos}")
        name = blob[name_start : name_end - 1].decode()
        data_start = name_end + _pad4(HEADER_SIZE + namesize)
        data_end = data_start + size
        if data_end > len(blob):
            raise GuestKitError(f"cpio entry {name!r} truncated")
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, uid, gid, nlink, mtime, blob[data_start:data_end], rmaj, rmin))
        pos = data_end + _pad4(size)


def write_archive_file(path: Path, build, *, compress: bool = False) -> None:
    """Create ``path`` atomically; ``build(writer)`` adds the entries.

    With ``compress`` the archive is gzip-compressed (mtime 0, so reproducible).
    """
    with atomic_output_file(path) as tmp, open(tmp, "wb") as raw:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                with CpioWriter(gz) as writer:  # type: ignore[arg-type]
                    build(writer)
        else:
            with CpioWriter(raw) as writer:
                build(writer)
