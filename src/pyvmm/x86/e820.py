"""The E820 memory map: what the firmware would tell the OS about RAM and holes.

pyvmm has no BIOS, so the boot loaders hand this map to the guest directly
(Linux zero page, PVH memmap, multiboot mmap).  The map is derived from
:class:`GuestMemory` so it can never claim RAM that is not backed, and the
machine may pass extra reserved ranges (MMIO windows, firmware tables) which
are carved out of any RAM they overlap.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout


class E820Type(enum.IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3  # ACPI reclaimable
    NVS = 4  # ACPI NVS
    UNUSABLE = 5
    PMEM = 7


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


def _subtract(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Remove ``[start, end)`` from a list of half-open ranges."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if end <= a or start >= b:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if end < b:
            out.append((end, b))
    return out


def build_e820(memory: GuestMemory,
               reserved: Iterable[tuple[int, int] | E820Entry] = ()) -> list[E820Entry]:
    """E820 map for ``memory``: RAM regions minus the EBDA/BIOS hole, plus ``reserved``.

    ``reserved`` holds ``(addr, size)`` pairs or :class:`E820Entry` objects
    (whose type is kept, e.g. ACPI tables).  They win over RAM where they
    overlap.  The result is sorted, non-overlapping and has adjacent entries
    of one type merged.
    """
    ram: list[tuple[int, int]] = [(r.gpa, r.end) for r in memory.regions]
    extra: list[E820Entry] = []
    low_end = min(layout.LOW_RESERVED_END, memory.below_4g)
    if layout.LOW_RESERVED_START < low_end:
        extra.append(E820Entry(layout.LOW_RESERVED_START, layout.LOW_RESERVED_END - layout.LOW_RESERVED_START,
                               E820Type.RESERVED))
    for item in reserved:
        if isinstance(item, E820Entry):
            entry = item
        else:
            addr, size = item
            entry = E820Entry(addr, size, E820Type.RESERVED)
        if entry.size <= 0 or entry.addr < 0:
            raise ValueError(f"invalid E820 reservation {entry.addr:#x}+{entry.size:#x}")
        extra.append(entry)
    for e in extra:
        ram = _subtract(ram, e.addr, e.end)
    # Reserved ranges may overlap each other; keep the first claim on each byte.
    claimed: list[E820Entry] = []
    for e in extra:
        pieces = [(e.addr, e.end)]
        for c in claimed:
            pieces = [p for a, b in pieces for p in _subtract([(a, b)], c.addr, c.end)]
        claimed.extend(E820Entry(a, b - a, e.type) for a, b in pieces)
    entries = [E820Entry(a, b - a, E820Type.RAM) for a, b in ram if b > a] + claimed
    entries.sort(key=lambda e: e.addr)
    merged: list[E820Entry] = []
    for e in entries:
        if merged and merged[-1].type == e.type and merged[-1].end == e.addr:
            prev = merged.pop()
            e = E820Entry(prev.addr, prev.size + e.size, e.type)
        merged.append(e)
    return merged


def usable_ranges(e820: Sequence[E820Entry]) -> list[tuple[int, int]]:
    """The ``(start, end)`` of every RAM entry, in address order."""
    return sorted((e.addr, e.end) for e in e820 if e.type == E820Type.RAM)


def find_top_down(e820: Sequence[E820Entry], size: int, *, limit: int, align: int = layout.PAGE_SIZE,
                  floor: int = 0, avoid: Sequence[tuple[int, int]] = ()) -> int | None:
    """Highest ``align``-ed address ``a`` with ``[a, a+size)`` in RAM, ``floor <= a`` and ``a+size <= limit``.

    ``avoid`` lists ``(start, end)`` ranges that must not be overlapped (the
    kernel image, other modules).  Returns ``None`` if nothing fits; this is
    how the initrd is placed at the top of low memory, as boot loaders do.
    """
    free: list[tuple[int, int]] = []
    for a, b in usable_ranges(e820):
        a, b = max(a, floor), min(b, limit)
        if b > a:
            free.append((a, b))
    for s, e in avoid:
        free = _subtract(free, s, e)
    for a, b in sorted(free, reverse=True):
        cand = layout.align_down(b - size, align)
        if size <= b - a and cand >= a:
            return cand
    return None


def in_ram(e820: Sequence[E820Entry], addr: int, size: int) -> bool:
    """Whether ``[addr, addr+size)`` lies inside one RAM entry."""
    return any(a <= addr and addr + size <= b for a, b in usable_ranges(e820))
