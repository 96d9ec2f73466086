"""The stream: a magic and format version, then checked records.

::

    "PYVMMSTA" u32 format-version
    record*:  u8 kind, u32 length, payload[length], u32 crc32(kind + payload)

Record kinds:

* ``H`` header (first, once): the machine configuration (:func:`machine_fingerprint` of the
  source), encoded with :mod:`.codec`;
* ``S`` section: ``{"id", "driver", "version", "state"}``, one per device id;
* ``Z`` zero RAM: u64 guest-physical address, u64 length;
* ``P`` RAM data: u64 guest-physical address, then the bytes;
* ``M`` mapped RAM (``mapped-ram`` files, :mod:`.mapped`): u64 gpa, u64 size, u64 file offset;
* ``E`` end: the stream is complete.

A loader refuses an unknown record kind, a newer format version, a bad checksum and a stream
that ends before ``E`` with one :class:`VmStateError` line each.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from pyvmm.vmstate import codec
from pyvmm.vmstate.protocol import VmStateError

MAGIC = b"PYVMMSTA"
FORMAT_VERSION = 1
MAX_RECORD = 64 << 20          # a RAM record carries at most a few MiB; sections are small
_REC = struct.Struct("<cI")
_CRC = struct.Struct("<I")
_U64X2 = struct.Struct("<QQ")
_U64 = struct.Struct("<Q")

HEADER, SECTION, ZERO, PAGES, END, MAPPED = b"H", b"S", b"Z", b"P", b"E", b"M"
KINDS = (HEADER, SECTION, ZERO, PAGES, END, MAPPED)


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> Any: ...


class Source(Protocol):
    def read(self, n: int) -> bytes: ...


class StreamWriter:
    """Writes records to ``sink``; counts bytes, and throttles to ``max_bandwidth`` bytes/s if set."""

    def __init__(self, sink: Sink, *, max_bandwidth: Callable[[], int] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> None:
        self.sink = sink
        self.bytes = 0
        self._max_bandwidth = max_bandwidth
        self._cancelled = cancelled
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._raw(MAGIC + struct.pack("<I", FORMAT_VERSION))

    def _raw(self, data: bytes | memoryview) -> None:
        if self._cancelled is not None and self._cancelled():
            raise VmStateError("migration cancelled")
        self.sink.write(data)
        n = len(data)
        self.bytes += n
        limit = self._max_bandwidth() if self._max_bandwidth is not None else 0
        if limit > 0:
            self._window_bytes += n
            ahead = self._window_bytes / limit - (time.monotonic() - self._window_start)
            if ahead > 0:
                time.sleep(ahead)
            if time.monotonic() - self._window_start > 1.0:
                self._window_start, self._window_bytes = time.monotonic(), 0

    def record(self, kind: bytes, *parts: bytes | memoryview) -> None:
        length = sum(len(p) for p in parts)
        crc = zlib.crc32(kind)
        for p in parts:
            crc = zlib.crc32(p, crc)
        self._raw(_REC.pack(kind, length))
        for p in parts:
            self._raw(p)
        self._raw(_CRC.pack(crc & 0xFFFFFFFF))

    def header(self, machine: dict[str, Any], **extra: Any) -> None:
        """``machine``: the configuration the destination must match; ``extra``: other facts
        (the source's run state)."""
        self.record(HEADER, codec.encode({**extra, "machine": machine, "created": time.time()}))

    def section(self, ident: str, driver: str, version: int, state: Any) -> None:
        self.record(SECTION, codec.encode({"id": ident, "driver": driver, "version": version, "state": state}))

    def zero(self, gpa: int, length: int) -> None:
        self.record(ZERO, _U64X2.pack(gpa, length))

    def pages(self, gpa: int, data: bytes | memoryview) -> None:
        self.record(PAGES, _U64.pack(gpa), data)

    def end(self) -> None:
        self.record(END)


class StreamReader:
    """Reads and checks records from ``source``."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.bytes = 0
        head = self._exact(len(MAGIC) + 4, at_start=True)
        if head[:len(MAGIC)] != MAGIC:
            raise VmStateError("not a pyvmm VM state stream (bad magic)")
        (version,) = struct.unpack("<I", head[len(MAGIC):])
        if version != FORMAT_VERSION:
            raise VmStateError(f"VM state stream format version {version} is not supported "
                               f"(this pyvmm reads version {FORMAT_VERSION})")

    def _exact(self, n: int, at_start: bool = False) -> bytes:
        chunks = []
        left = n
        while left:
            b = self.source.read(left)
            if not b:
                if at_start and left == n:
                    raise VmStateError("VM state stream is empty")
                raise VmStateError(f"VM state stream truncated after {self.bytes + n - left} bytes")
            chunks.append(b)
            left -= len(b)
        self.bytes += n
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def record(self) -> tuple[bytes, bytes]:
        kind, length = _REC.unpack(self._exact(_REC.size))
        if kind not in KINDS:
            raise VmStateError(f"VM state stream corrupt: unknown record kind {kind!r} at byte {self.bytes}")
        if length > MAX_RECORD:
            raise VmStateError(f"VM state stream corrupt: a record of {length} bytes at byte {self.bytes}")
        payload = self._exact(length) if length else b""
        (crc,) = _CRC.unpack(self._exact(_CRC.size))
        if zlib.crc32(payload, zlib.crc32(kind)) & 0xFFFFFFFF != crc:
            raise VmStateError(f"VM state stream corrupt: checksum mismatch in the record ending at byte {self.bytes}")
        return kind, payload


def parse_header(payload: bytes) -> dict[str, Any]:
    """The whole header; its ``"machine"`` is the source's configuration."""
    h = codec.decode(payload)
    if not isinstance(h, dict) or not isinstance(h.get("machine"), dict):
        raise VmStateError("VM state stream corrupt: bad header")
    return h


def parse_section(payload: bytes) -> tuple[str, str, int, Any]:
    s = codec.decode(payload)
    if (not isinstance(s, dict) or not isinstance(s.get("id"), str) or not isinstance(s.get("driver"), str)
            or not isinstance(s.get("version"), int) or "state" not in s):
        raise VmStateError("VM state stream corrupt: bad section")
    return s["id"], s["driver"], s["version"], s["state"]


def parse_zero(payload: bytes) -> tuple[int, int]:
    if len(payload) != _U64X2.size:
        raise VmStateError("VM state stream corrupt: bad zero-RAM record")
    gpa, length = _U64X2.unpack(payload)
    return gpa, length


def parse_pages(payload: bytes) -> tuple[int, memoryview]:
    if len(payload) < _U64.size:
        raise VmStateError("VM state stream corrupt: bad RAM record")
    (gpa,) = _U64.unpack_from(payload)
    return gpa, memoryview(payload)[_U64.size:]


def compare_machines(saved: dict[str, Any], here: dict[str, Any]) -> None:
    """Refuse a stream from a machine configured otherwise (one line naming the first difference)."""
    for key in sorted(set(saved) | set(here)):
        a, b = saved.get(key), here.get(key)
        if a != b:
            raise VmStateError(f"VM state is for another machine configuration: {key} is {_show(a)} in the "
                               f"stream, {_show(b)} here")


def _show(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)
