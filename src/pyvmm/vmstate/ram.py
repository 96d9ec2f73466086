"""Guest RAM in the stream, and the passes of pre-copy.

RAM goes in 64 KiB chunks.  A chunk of zeros is one small ``Z`` record (runs of them merge),
found with a C-speed comparison (``mmap.find`` of a zero chunk), never a Python loop over bytes.
Other chunks go as ``P`` records straight from bytes slices of the guest mapping.

Pre-copy (:class:`RamSender` with ``track=True``) keeps what it sent of each chunk: a later pass
compares the chunk with that copy (``bytes ==`` is memcmp) and sends the 4 KiB pages that
differ.  This finds every change, whoever made it (a vCPU, a device's DMA, a block read
into guest memory), without a write hook on the guest's hot path, and is the same on every
accelerator.  The price is a copy of the non-zero RAM on the source while a migration runs.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass

from pyvmm.memory import GuestMemory, GuestMemoryError, RamRegion
from pyvmm.vmstate.protocol import VmStateError
from pyvmm.vmstate.stream import StreamWriter

CHUNK = 64 << 10
PAGE = 4 << 10
SPAN = 16 * CHUNK             # the full pass checks 1 MiB at a time for zeros first
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_SPAN = bytes(SPAN)


@dataclass
class PassStats:
    dirty_bytes: int = 0      # RAM bytes sent in the pass (data pages)
    zero_bytes: int = 0       # RAM bytes sent as zero records
    seconds: float = 0.0


def _untouched_map(r: RamRegion) -> bytes | None:
    """The region's /proc/self/pagemap entries: 0 for a page never touched (neither present nor
    swapped), which in private anonymous memory reads as zeros.  Reading the map is one read of
    8 bytes per page instead of faulting every page in to compare it."""
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek((r.host_addr // PAGE) * 8)
            data = f.read((r.size // PAGE) * 8)
    except OSError:
        return None
    return data if len(data) == (r.size // PAGE) * 8 else None


_ZERO_ENTRIES = bytes(8 * (SPAN // PAGE))


def _untouched(entries: bytes | None, off: int, length: int) -> bool:
    if entries is None:
        return False
    a, n = off // PAGE * 8, length // PAGE * 8
    return entries[a:a + n] == _ZERO_ENTRIES[:n]


def _is_zero(mapping: mmap.mmap, off: int, length: int) -> bool:
    needle = _ZERO_CHUNK if length == CHUNK else _ZERO_SPAN if length == SPAN else bytes(length)
    return mapping.find(needle, off, off + length) == off


class RamSender:
    """Writes guest RAM to a stream: one full pass, then (``track``) passes of what changed."""

    def __init__(self, memory: GuestMemory, writer: StreamWriter, *, track: bool = False) -> None:
        self.memory = memory
        self.writer = writer
        self.track = track
        self._sent: list[list[bytes | None]] = [[None] * ((r.size + CHUNK - 1) // CHUNK) for r in memory.regions]
        self.total = sum(r.size for r in memory.regions)

    def full_pass(self) -> PassStats:
        st = PassStats()
        t0 = time.monotonic()
        w = self.writer
        for ri, r in enumerate(self.memory.regions):
            sent = self._sent[ri]
            m = r.mapping
            zero_start: int | None = None
            skip_to = 0
            untouched = _untouched_map(r) if _private_anonymous(self.memory) else None
            for ci, off in enumerate(range(0, r.size, CHUNK)):
                length = min(CHUNK, r.size - off)
                if off >= skip_to and off % SPAN == 0 and off + SPAN <= r.size and (
                        _untouched(untouched, off, SPAN) or _is_zero(m, off, SPAN)):
                    skip_to = off + SPAN    # a whole span of zeros: one check for 16 chunks
                if off < skip_to or _untouched(untouched, off, length) or _is_zero(m, off, length):
                    if zero_start is None:
                        zero_start = off
                    st.zero_bytes += length
                    continue
                if zero_start is not None:
                    w.zero(r.gpa + zero_start, off - zero_start)
                    zero_start = None
                data = m[off:off + length]
                w.pages(r.gpa + off, data)
                st.dirty_bytes += length
                if self.track:
                    sent[ci] = data
            if zero_start is not None:
                w.zero(r.gpa + zero_start, r.size - zero_start)
        st.seconds = time.monotonic() - t0
        return st

    def dirty_pass(self, written: list[tuple[int, int]] | None = None) -> PassStats:
        """Send what changed since the last pass (``track`` only).

        ``written``: (gpa, length) ranges an accelerator's dirty log reports (KVM); only their
        chunks are compared then.  Without it every chunk is.
        """
        assert self.track
        st = PassStats()
        t0 = time.monotonic()
        for ri, r in enumerate(self.memory.regions):
            chunks = None if written is None else _chunks_of(r, written)
            self._region_pass(r, self._sent[ri], st, chunks)
        st.seconds = time.monotonic() - t0
        return st

    def _region_pass(self, r: RamRegion, sent: list[bytes | None], st: PassStats,
                     chunks: list[int] | None) -> None:
        w = self.writer
        m = r.mapping
        untouched = _untouched_map(r) if _private_anonymous(self.memory) else None
        for ci in range(len(sent)) if chunks is None else chunks:
            off = ci * CHUNK
            old = sent[ci]
            length = min(CHUNK, r.size - off)
            if old is None:
                if _untouched(untouched, off, length) or _is_zero(m, off, length):
                    continue
                data = m[off:off + length]
                w.pages(r.gpa + off, data)
                st.dirty_bytes += length
                sent[ci] = data
                continue
            if m.find(old, off, off + length) == off:  # unchanged: compared in place, nothing copied
                continue
            data = m[off:off + length]
            if data == _ZERO_CHUNK[:length]:
                w.zero(r.gpa + off, length)
                st.zero_bytes += length
                sent[ci] = None
                continue
            run = -1
            for p in range(0, length, PAGE):
                if data[p:p + PAGE] != old[p:p + PAGE]:
                    if run < 0:
                        run = p
                elif run >= 0:
                    w.pages(r.gpa + off + run, memoryview(data)[run:p])
                    st.dirty_bytes += p - run
                    run = -1
            if run >= 0:
                w.pages(r.gpa + off + run, memoryview(data)[run:length])
                st.dirty_bytes += length - run
            sent[ci] = data

    def release(self) -> None:
        self._sent = [[None] * len(s) for s in self._sent]


def _chunks_of(r: RamRegion, written: list[tuple[int, int]]) -> list[int]:
    """The indexes of ``r``'s chunks that the ranges touch, in order."""
    out: set[int] = set()
    for gpa, length in written:
        lo, hi = max(gpa, r.gpa), min(gpa + length, r.end)
        if lo < hi:
            out.update(range((lo - r.gpa) // CHUNK, (hi - 1 - r.gpa) // CHUNK + 1))
    return sorted(out)


def _region_of(memory: GuestMemory, gpa: int, length: int) -> RamRegion:
    try:
        return memory.region_for(gpa, max(1, length))
    except GuestMemoryError:
        raise VmStateError(f"VM state stream corrupt: RAM record for {gpa:#x}+{length:#x} is outside guest "
                           "RAM") from None


def load_zero(memory: GuestMemory, gpa: int, length: int) -> None:
    r = _region_of(memory, gpa, length)
    off = gpa - r.gpa
    if off % PAGE or length % PAGE or not memory.contains(gpa, length):
        raise VmStateError(f"VM state stream corrupt: zero-RAM record {gpa:#x}+{length:#x} is not page-aligned")
    if _private_anonymous(memory) and hasattr(mmap, "MADV_DONTNEED"):
        r.mapping.madvise(mmap.MADV_DONTNEED, off, length)  # private anonymous: reads as zeros, frees it
    else:
        memory.fill(gpa, length, 0)


def _private_anonymous(memory: GuestMemory) -> bool:
    backend = getattr(memory, "backend", None)
    return memory.mem_path is None and (backend is None or (backend.kind == "ram" and not backend.share))


def load_pages(memory: GuestMemory, gpa: int, data: memoryview) -> None:
    if not memory.contains(gpa, max(1, len(data))):
        raise VmStateError(f"VM state stream corrupt: RAM record for {gpa:#x}+{len(data):#x} is outside guest RAM")
    memory.write(gpa, data)
