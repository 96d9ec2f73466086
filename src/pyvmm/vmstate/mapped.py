"""Mapped RAM: a state file whose RAM can be mapped instead of read (Firecracker-style restore).

With the ``mapped-ram`` capability and a ``file:PATH`` URI (QEMU 9's spelling), the file is
an ordinary stream (header, sections, end) that also holds one ``M`` record per RAM region
(u64 gpa, u64 size, u64 file offset), followed by the RAM itself at those page-aligned
offsets, zero chunks left as holes.  Restoring maps each region ``MAP_PRIVATE | MAP_FIXED``
over the destination's RAM at the same host address (so the accelerator's view stays
valid): pages fault in from the file when the guest touches them, restore time does not
grow with RAM size, and the file is never written (many restores can share it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import struct

from pyvmm.memory import GuestMemory
from pyvmm.vmstate.protocol import VmStateError
from pyvmm.vmstate.ram import CHUNK, PAGE, _is_zero, _private_anonymous, _untouched, _untouched_map

MAPPED = b"M"
ALIGN = 2 << 20
_MAP = struct.Struct("<QQQ")


def layout(memory: GuestMemory, prefix_len: int) -> list[tuple[int, int, int]]:
    """(gpa, size, file offset) of each region when the records take ``prefix_len`` bytes."""
    off = (prefix_len + ALIGN - 1) // ALIGN * ALIGN
    out = []
    for r in memory.regions:
        out.append((r.gpa, r.size, off))
        off += (r.size + ALIGN - 1) // ALIGN * ALIGN
    return out


def record(gpa: int, size: int, offset: int) -> bytes:
    return _MAP.pack(gpa, size, offset)


def parse(payload: bytes) -> tuple[int, int, int]:
    if len(payload) != _MAP.size:
        raise VmStateError("VM state stream corrupt: bad mapped-RAM record")
    gpa, size, offset = _MAP.unpack(payload)
    if offset % PAGE or size % PAGE:
        raise VmStateError("VM state stream corrupt: mapped RAM is not page-aligned")
    return gpa, size, offset


def write_ram(fd: int, memory: GuestMemory, places: list[tuple[int, int, int]]) -> int:
    """Write each region's non-zero chunks at its offset; returns the bytes written."""
    written = 0
    for r, (_gpa, size, offset) in zip(memory.regions, places, strict=True):
        m = r.mapping
        untouched = _untouched_map(r) if _private_anonymous(memory) else None
        for off in range(0, size, CHUNK):
            length = min(CHUNK, size - off)
            if not _untouched(untouched, off, length) and not _is_zero(m, off, length):
                os.pwrite(fd, m[off:off + length], offset + off)
                written += length
    end = places[-1][2] + places[-1][1] if places else 0
    if os.fstat(fd).st_size < end:
        os.ftruncate(fd, end)
    return written


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
MAP_FIXED = 0x10


def map_regions(memory: GuestMemory, path: str, places: list[tuple[int, int, int]]) -> None:
    """Map the file's RAM over the guest's, private and lazy (pages fault in on first touch)."""
    if len(places) != len(memory.regions):
        raise VmStateError("mapped RAM: the file's regions do not match this machine's")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < max(o + s for _g, s, o in places):
            raise VmStateError("VM state stream truncated: mapped RAM runs past the end of the file")
        for r, (gpa, size, offset) in zip(memory.regions, places, strict=True):
            if (gpa, size) != (r.gpa, r.size):
                raise VmStateError(f"mapped RAM: region {gpa:#x}+{size:#x} in the file, {r.gpa:#x}+{r.size:#x} here")
            addr = _libc.mmap(r.host_addr, size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_PRIVATE | MAP_FIXED, fd, offset)
            if addr in (None, ctypes.c_void_p(-1).value) or addr != r.host_addr:
                err = ctypes.get_errno()
                raise VmStateError(f"mapped RAM: cannot map {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
