"""The host-side dirty page log (device DMA) and the bitmap-to-ranges conversion the KVM log uses."""

from __future__ import annotations

import pytest

from pyvmm.accel.kvm_state import bitmap_runs
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import PAGE_SIZE, GuestMemory, bitmap_bytes


def set_bits(bm: bytes | bytearray) -> set[int]:
    return {i for i in range(len(bm) * 8) if bm[i >> 3] >> (i & 7) & 1}


@pytest.fixture
def mem():
    m = GuestMemory(8 << 20, split=(4 << 20, 16 << 20))  # two regions: [0, 4M) and [16M, 20M)
    yield m
    m.close()


def test_marks_only_while_tracking_and_take_clears(mem: GuestMemory) -> None:
    mem.dirty.mark(0, 4096)
    assert not mem.dirty.active and set_bits(mem.dirty.take(0)) == set()
    mem.dirty.start()
    mem.dirty.mark(0x1FFF, 2)  # straddles pages 1 and 2
    mem.dirty.mark(0x5000, 0)  # empty: nothing
    mem.dirty.mark((16 << 20) + 3 * PAGE_SIZE, 1)
    assert set_bits(mem.dirty.take(0)) == {1, 2}
    assert set_bits(mem.dirty.take(0)) == set()
    assert set_bits(mem.dirty.take(1)) == {3}
    mem.dirty.stop()
    mem.dirty.mark(0, 4096)
    assert set_bits(mem.dirty.take(0)) == set()


def test_ranges_outside_ram_mark_only_what_is_inside(mem: GuestMemory) -> None:
    mem.dirty.start()
    mem.dirty.mark((4 << 20) - PAGE_SIZE, (12 << 20) + 2 * PAGE_SIZE)  # last low page, hole, first high page
    mem.dirty.mark(-(1 << 40), 1)
    mem.dirty.mark(1 << 51, 1 << 20)
    assert set_bits(mem.dirty.take(0)) == {1023}
    assert set_bits(mem.dirty.take(1)) == {0}
    with pytest.raises(GuestMemoryError, match="no RAM region 2"):
        mem.dirty.take(2)


def test_bitmaps_are_whole_64_bit_words_as_kvm_writes_them() -> None:
    assert bitmap_bytes(1) == 8 and bitmap_bytes(64) == 8 and bitmap_bytes(65) == 16
    m = GuestMemory(1 << 20)
    try:
        m.dirty.start()
        assert len(m.dirty.take(0)) == bitmap_bytes(256)
    finally:
        m.close()


def test_bitmap_runs_merge_adjacent_pages_across_words() -> None:
    bm = bytearray(16)
    for page in (0, 4, 5, 63, 64, 65, 127):
        bm[page >> 3] |= 1 << (page & 7)
    assert bitmap_runs(bm, 0x10000) == [
        (0x10000, PAGE_SIZE), (0x10000 + 4 * PAGE_SIZE, 2 * PAGE_SIZE),
        (0x10000 + 63 * PAGE_SIZE, 3 * PAGE_SIZE), (0x10000 + 127 * PAGE_SIZE, PAGE_SIZE)]
    assert bitmap_runs(bytes(8), 0) == []
    assert bitmap_runs(b"\xff" * 3, 0) == [(0, 24 * PAGE_SIZE)]  # not a whole word: padded


def test_guest_memory_writes_mark_their_pages(mem: GuestMemory) -> None:
    mem.write_u8(0x10, 1)  # not tracking: nothing kept
    mem.dirty.start()
    mem.write_u16(0x2FFF, 0xFFFF)  # straddles pages 2 and 3
    mem.write_u32(0x5000, 1)
    mem.write_u64(0x7000, 1)
    mem.write(0x9000, b"x" * 5000)  # pages 9 and 10
    mem.fill(0xC000, 1)
    mem.write_u8((16 << 20) + 0x1000, 7)
    assert set_bits(mem.dirty.take(0)) == {2, 3, 5, 7, 9, 10, 12}
    assert set_bits(mem.dirty.take(1)) == {1}
    mem.read_u32(0x20000)
    mem.view(0x30000, 8)[0] = 1  # views are the devices' to report (their DMA hook)
    assert set_bits(mem.dirty.take(0)) == set()


def test_large_marks_and_full_words_are_exact(mem: GuestMemory) -> None:
    mem.dirty.start()
    mem.dirty.mark(3 * PAGE_SIZE + 5, 100 * PAGE_SIZE)  # pages 3..103 (the end is inside page 103)
    assert set_bits(mem.dirty.take(0)) == set(range(3, 104))
    mem.dirty.mark(0, 4 << 20)  # the whole region
    bm = mem.dirty.take(0)
    assert set_bits(bm) == set(range(1024))
    assert bitmap_runs(bm, 0) == [(0, 4 << 20)]
    words = bytearray(b"\xff" * 8 + b"\x01" + b"\0" * 7 + b"\xff" * 16 + b"\x80" + b"\0" * 6 + b"\x80")
    assert bitmap_runs(words, 0) == [(0, 65 * PAGE_SIZE), (128 * PAGE_SIZE, 128 * PAGE_SIZE),
                                     (263 * PAGE_SIZE, PAGE_SIZE), (319 * PAGE_SIZE, PAGE_SIZE)]
