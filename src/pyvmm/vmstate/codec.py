"""Plain data to bytes and back.

A value is None, bool, int (any size), float, str, bytes, list or dict (keys of the same kinds).
Each is one tag byte and a little-endian body.  Decoding checks every length against what is
left and the nesting depth, so a corrupt or hostile stream raises :class:`VmStateError` and
never allocates more than its own size.
"""

from __future__ import annotations

import struct
from typing import Any

from pyvmm.vmstate.protocol import VmStateError

MAX_DEPTH = 32
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")


def encode(value: Any) -> bytes:
    out = bytearray()
    _enc(value, out, 0)
    return bytes(out)


def _enc(v: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise VmStateError("state nested too deeply to save")
    if v is None:
        out += b"N"
    elif v is True:
        out += b"T"
    elif v is False:
        out += b"F"
    elif isinstance(v, int):
        n = int(v)
        body = n.to_bytes(max(1, (n.bit_length() + 8) // 8), "little", signed=True)
        out += b"i" + bytes((len(body),)) + body
    elif isinstance(v, float):
        out += b"d" + _F64.pack(v)
    elif isinstance(v, str):
        b = v.encode()
        out += b"s" + _U32.pack(len(b)) + b
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        out += b"b" + _U32.pack(len(b)) + b
    elif isinstance(v, (list, tuple)):
        out += b"l" + _U32.pack(len(v))
        for item in v:
            _enc(item, out, depth + 1)
    elif isinstance(v, dict):
        out += b"m" + _U32.pack(len(v))
        for k, item in v.items():
            _enc(k, out, depth + 1)
            _enc(item, out, depth + 1)
    else:
        raise VmStateError(f"cannot save a value of type {type(v).__name__}")


def decode(data: bytes) -> Any:
    value, pos = _Decoder(data).value(0, 0)
    if pos != len(data):
        raise VmStateError("corrupt state: trailing bytes after a value")
    return value


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.n = len(data)

    def _need(self, pos: int, count: int) -> None:
        if count < 0 or pos + count > self.n:
            raise VmStateError("corrupt state: a value runs past its section")

    def _u32(self, pos: int) -> int:
        self._need(pos, 4)
        return int(_U32.unpack_from(self.data, pos)[0])

    def value(self, pos: int, depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:
            raise VmStateError("corrupt state: nested too deeply")
        self._need(pos, 1)
        tag = self.data[pos]
        pos += 1
        if tag == 0x4E:  # N
            return None, pos
        if tag == 0x54:  # T
            return True, pos
        if tag == 0x46:  # F
            return False, pos
        if tag == 0x69:  # i
            self._need(pos, 1)
            ln = self.data[pos]
            self._need(pos + 1, ln)
            return int.from_bytes(self.data[pos + 1:pos + 1 + ln], "little", signed=True), pos + 1 + ln
        if tag == 0x64:  # d
            self._need(pos, 8)
            return _F64.unpack_from(self.data, pos)[0], pos + 8
        if tag in (0x73, 0x62):  # s, b
            ln = self._u32(pos)
            self._need(pos + 4, ln)
            raw = bytes(self.data[pos + 4:pos + 4 + ln])
            if tag == 0x62:
                return raw, pos + 4 + ln
            try:
                return raw.decode(), pos + 4 + ln
            except UnicodeDecodeError:
                raise VmStateError("corrupt state: a string is not UTF-8") from None
        if tag == 0x6C:  # l
            count = self._u32(pos)
            pos += 4
            self._need(pos, count)  # every item takes at least one byte
            items = []
            for _ in range(count):
                item, pos = self.value(pos, depth + 1)
                items.append(item)
            return items, pos
        if tag == 0x6D:  # m
            count = self._u32(pos)
            pos += 4
            self._need(pos, 2 * count)
            out: dict[Any, Any] = {}
            for _ in range(count):
                key, pos = self.value(pos, depth + 1)
                if isinstance(key, (list, dict)):
                    raise VmStateError("corrupt state: a map key is not a plain value")
                out[key], pos = self.value(pos, depth + 1)
            return out, pos
        raise VmStateError(f"corrupt state: unknown value tag {tag:#x}")
