"""Unpack selected files from a Debian package in pure Python.

A ``.deb`` is an ``ar`` archive holding ``debian-binary``, ``control.tar.*``
and ``data.tar.{xz,zst,gz,bz2}``.  We only ever need a few paths out of the data
tarball (the kernel image and its module tree, or busybox), so the tarball is
streamed through the right decompressor and filtered member by member; nothing
is installed on the host and no root is needed.

Zstandard-compressed data (Ubuntu, newer Debian) needs the optional
``zstandard`` module; without it we fall back to ``dpkg-deb --fsys-tarfile`` or
the ``zstd`` program, whichever exists.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import logging
import lzma
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pyvmm.guestkit.errors import GuestKitError

log = logging.getLogger(__name__)

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60


@dataclass(frozen=True)
class ArMember:
    """Name, payload offset and size of one ``ar`` member."""

    name: str
    offset: int
    size: int


def list_ar(fh: BinaryIO, total_size: int) -> list[ArMember]:
    """Parse the ``ar`` member table of an open file (payloads are not read)."""
    fh.seek(0)
    if fh.read(len(AR_MAGIC)) != AR_MAGIC:
        raise GuestKitError("not a Debian package (missing ar magic)")
    members: list[ArMember] = []
    pos = len(AR_MAGIC)
    while pos < total_size:
        fh.seek(pos)
        header = fh.read(AR_HEADER_SIZE)
        if len(header) == 0:
            break
        if len(header) != AR_HEADER_SIZE or header[58:60] != b"`\n":
            raise GuestKitError(f"corrupt ar header at offset {pos}")
        name = header[0:16].decode("ascii", "replace").rstrip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as exc:
            raise GuestKitError(f"corrupt ar member size at offset {pos}") from exc
        start = pos + AR_HEADER_SIZE
        if size < 0 or start + size > total_size:
            raise GuestKitError(f"ar member {name!r} is truncated")
        members.append(ArMember(name, start, size))
        pos = start + size + (size & 1)
    return members


class _SliceReader(io.RawIOBase):
    """Read-only view of ``size`` bytes at ``offset`` that reports progress."""

    def __init__(self, fh: BinaryIO, offset: int, size: int, progress: Callable[[int, int], None]) -> None:
        self._fh = fh
        self._offset = offset
        self._size = size
        self._pos = 0
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        remaining = self._size - self._pos
        if remaining <= 0:
            return 0
        want = min(len(buf), remaining)
        self._fh.seek(self._offset + self._pos)
        chunk = self._fh.read(want)
        n = len(chunk)
        buf[:n] = chunk
        self._pos += n
        self._progress(self._pos, self._size)
        return n


class _ProgressLogger:
    """Log "<label>: NN%" at every 10 % step (cheap: one comparison per read)."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._next = 10

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        pct = done * 100 // total
        if pct >= self._next:
            log.info("%s: %d%%", self._label, pct)
            self._next = (pct // 10 + 1) * 10


def _zstd_reader(raw: BinaryIO) -> BinaryIO | None:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        return None
    return zstandard.ZstdDecompressor().stream_reader(raw)  # type: ignore[no-any-return]


@contextlib.contextmanager
def _open_data_tar(deb: Path, label: str) -> Iterator[tarfile.TarFile]:
    """Yield the package's data tarball as a streaming TarFile."""
    try:
        size = deb.stat().st_size
        fh = open(deb, "rb")
    except OSError as exc:
        raise GuestKitError(f"cannot open {deb}: {exc.strerror}") from exc
    with fh:
        members = list_ar(fh, size)
        data = [m for m in members if m.name.startswith("data.tar")]
        if not data:
            raise GuestKitError(f"{deb.name}: no data.tar member (corrupt package?)")
        member = data[0]
        raw = io.BufferedReader(_SliceReader(fh, member.offset, member.size, _ProgressLogger(label)))
        suffix = member.name[len("data.tar") :]
        stream: BinaryIO | None
        if suffix == ".xz" or suffix == ".lzma":
            stream = lzma.open(raw)  # type: ignore[assignment]
        elif suffix == ".gz":
            stream = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
        elif suffix == ".bz2":
            stream = bz2.BZ2File(raw)  # type: ignore[assignment]
        elif suffix == "":
            stream = raw
        elif suffix == ".zst":
            stream = _zstd_reader(raw)
        else:
            raise GuestKitError(f"{deb.name}: unsupported data compression {member.name!r}")
        if stream is None:
            with _external_tar_stream(deb) as tar:
                yield tar
            return
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield tar
        except (tarfile.TarError, lzma.LZMAError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise GuestKitError(f"{deb.name}: corrupt data archive ({exc})") from exc


@contextlib.contextmanager
def _external_tar_stream(deb: Path) -> Iterator[tarfile.TarFile]:
    """Decompress with dpkg-deb (or zstd) when Python lacks the codec."""
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise GuestKitError(f"{deb.name} is zstd-compressed: install the 'zstandard' Python package or dpkg")
    log.info("using dpkg-deb to decompress %s (Python 'zstandard' not installed)", deb.name)
    proc = subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            yield tar
    except tarfile.TarError as exc:
        raise GuestKitError(f"{deb.name}: corrupt data archive ({exc})") from exc
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.wait() != 0:
            raise GuestKitError(f"dpkg-deb failed on {deb.name}: {err.splitlines()[-1] if err else '?'}")


def _member_path(name: str) -> str:
    """Tar names in .debs look like ``./boot/vmlinuz-...``; strip to ``boot/vmlinuz-...``."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def extract_deb(deb: Path, dest: Path, select: Callable[[str], bool], label: str | None = None) -> list[str]:
    """Extract every data member whose path (e.g. ``boot/vmlinuz-6.1``) ``select`` accepts.

    Paths are kept as in the package, relative to ``dest``.  Members that would
    escape ``dest`` (absolute or ``..`` symlinks, device nodes) are skipped.
    Returns the extracted paths.
    """
    dest.mkdir(parents=True, exist_ok=True)
    label = label or f"extracting {deb.name}"
    extracted: list[str] = []
    with _open_data_tar(deb, label) as tar:
        for member in tar:
            path = _member_path(member.name)
            if not path or not select(path):
                continue
            member.name = path
            try:
                safe = tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                log.debug("skipping %s: %s", path, exc)
                continue
            if safe is None:
                continue
            tar.extract(safe, dest, filter="fully_trusted")
            extracted.append(path)
    log.info("%s: done (%d files)", label, len(extracted))
    return extracted
