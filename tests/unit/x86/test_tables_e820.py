"""E820 map construction and placement helpers."""

from __future__ import annotations

import pytest

from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.e820 import E820Entry, E820Type, build_e820, find_top_down, in_ram

RAM, RES = E820Type.RAM, E820Type.RESERVED
MiB, GiB = 1 << 20, 1 << 30


def triples(entries):
    return [(e.addr, e.size, int(e.type)) for e in entries]


def test_small_memory_map():
    mem = GuestMemory(64 * MiB)
    assert triples(build_e820(mem)) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x100000 - 0x9FC00, 2),
        (0x100000, 64 * MiB - 0x100000, 1),
    ]


def test_large_memory_splits_around_pci_hole():
    mem = layout.pc_memory(4 * GiB + 512 * MiB)  # lazily allocated: cheap
    try:
        e = build_e820(mem, reserved=[(layout.IOAPIC_ADDR, 0x1000), (layout.LAPIC_ADDR, 0x1000)])
        assert triples(e) == [
            (0, 0x9FC00, 1),
            (0x9FC00, 0x60400, 2),
            (0x100000, 0xC0000000 - 0x100000, 1),
            (0xFEC00000, 0x1000, 2),
            (0xFEE00000, 0x1000, 2),
            (0x100000000, 0x4000_0000 + 512 * MiB, 1),  # 3 GiB low, 1.5 GiB high
        ]
        assert sum(x.size for x in e if x.type == RAM) == mem.ram_size - 0x60400
    finally:
        mem.close()


def test_reserved_range_carves_ram_and_keeps_type():
    mem = GuestMemory(32 * MiB)
    e = build_e820(mem, reserved=[E820Entry(16 * MiB, MiB, E820Type.ACPI), (16 * MiB + MiB, MiB)])
    assert triples(e)[2:] == [
        (0x100000, 15 * MiB, 1),
        (16 * MiB, MiB, 3),
        (17 * MiB, MiB, 2),
        (18 * MiB, 14 * MiB, 1),
    ]
    # Sorted, no overlaps.
    for a, b in zip(e, e[1:], strict=False):
        assert a.end <= b.addr


def test_overlapping_reservations_do_not_duplicate():
    mem = GuestMemory(8 * MiB)
    e = build_e820(mem, reserved=[(2 * MiB, 2 * MiB), (3 * MiB, 2 * MiB)])
    assert triples(e)[2:] == [(0x100000, MiB, 1), (2 * MiB, 3 * MiB, 2), (5 * MiB, 3 * MiB, 1)]


def test_invalid_reservation_rejected():
    with pytest.raises(ValueError):
        build_e820(GuestMemory(2 * MiB), reserved=[(0x1000, 0)])


def test_find_top_down():
    mem = GuestMemory(64 * MiB)
    e = build_e820(mem)
    # Top of RAM, page aligned.
    assert find_top_down(e, 0x1800, limit=1 << 40) == 64 * MiB - 0x2000
    # Limit respected.
    assert find_top_down(e, MiB, limit=32 * MiB + 5) == 31 * MiB
    # Avoided range respected; falls below it.
    assert find_top_down(e, MiB, limit=1 << 40, avoid=[(60 * MiB, 64 * MiB)]) == 59 * MiB
    # Does not straddle the EBDA hole; does not fit at all -> None.
    assert find_top_down(e, 0x1000, limit=0x100000) == 0x9E000
    assert find_top_down(e, 65 * MiB, limit=1 << 40) is None
    assert in_ram(e, 0x100000, 63 * MiB)
    assert not in_ram(e, 0x9F000, 0x2000)
