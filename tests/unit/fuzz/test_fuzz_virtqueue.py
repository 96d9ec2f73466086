"""Fuzz target: split virtqueues and descriptor chains, driven as a device drives them.

Hypothesis writes descriptor tables (direct and indirect, with loops, NEXT indices past the table,
nested indirect tables, lengths up to 4 GiB, addresses that are in RAM, in the hole between the two
RAM regions, straddle a region's end, or are anything at all), the available ring and its index,
then a device consumes every chain: it fills each device-writable buffer and pushes the chain to
the used ring.  The guest is also allowed one *concurrent* rewrite: after the device's N-th read of
guest memory, a ring index, ring entry or descriptor changes under it.

Asserted (tests/unit/devices/virtio/test_virtio_fuzz.py covers the walk bounds on flat RAM):

* only :class:`VirtqueueError` escapes the queue, and each walk reads a bounded number of descriptors;
* every buffer handed out lies wholly in one RAM region; readable/writable lengths add up;
* guest memory changes only in device-writable buffers the guest described, the used ring (and its
  avail_event word) and what the guest itself rewrote: nothing outside the chains is touched;
* each used element names a popped head with the number of bytes the device wrote into it.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from pyvmm.devices.virtio.queue import Virtqueue, VirtqueueError
from pyvmm.memory import GuestMemory

LOW = 1 << 20          # RAM: [0, 1 MiB) and [2 MiB, 3 MiB), a hole between them
HIGH = 2 << 20
TOP = HIGH + LOW
DESC, AVAIL, USED, TABLES = 0x1000, 0x2000, 0x3000, 0x4000
BUF = 0x10000


class HostileMemory(GuestMemory):
    """Guest RAM whose guest rewrites one location after the device's ``trigger``-th read."""

    def __init__(self) -> None:
        super().__init__(2 * LOW, split=(LOW, HIGH))
        self.trigger = -1
        self.rewrite: tuple[int, bytes] | None = None
        self.reads = 0
        self.desc_reads = 0

    def _after_read(self) -> None:
        self.reads += 1
        if self.reads == self.trigger and self.rewrite is not None:
            gpa, data = self.rewrite
            super().write(gpa, data)

    def read(self, gpa: int, length: int) -> bytes:
        data = super().read(gpa, length)
        if length == 16:
            self.desc_reads += 1
        self._after_read()
        return data

    def read_u16(self, gpa: int) -> int:
        value = super().read_u16(gpa)
        self._after_read()
        return value

    def view(self, gpa: int, length: int) -> memoryview:
        v = super().view(gpa, length)
        assert any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions), \
            f"buffer {gpa:#x}+{length:#x} is not inside one RAM region"
        return v

    def snapshot(self) -> bytes:
        return super().read(0, LOW) + super().read(HIGH, LOW)


MEM = HostileMemory()

odd_addr_st = st.one_of(
    st.integers(LOW - 64, LOW + 64),                     # the end of low RAM, the hole
    st.integers(HIGH - 64, HIGH + 0x1000),               # the start of high RAM
    st.integers(TOP - 64, TOP + 64),                     # the end of RAM
    st.sampled_from([DESC, AVAIL, USED, TABLES, 0]),     # the rings themselves
    st.integers(0, (1 << 64) - 1),
)
odd_len_st = st.one_of(st.sampled_from([16, 32, 48, 4096, LOW, 0xFFFF_FFF0]), st.integers(0, (1 << 32) - 1))


# Strategies are built once (building them inside a composite costs more than drawing from them).
_d10 = st.integers(0, 9)
_buf_addr = st.integers(BUF, BUF + 0x10000)
_short_len = st.integers(0, 600)
_flags = st.sampled_from([0, 1, 2, 3])
_odd_flags = st.one_of(st.sampled_from([4, 5, 6, 7]), st.integers(0, 0xFFFF))
_u16 = st.integers(0, 0xFFFF)
_index = {n: st.integers(0, n - 1) for n in (1, 2, 4, 8, 12, 16)}
_upto = {n: st.integers(0, n) for n in (1, 2, 4, 8, 16)}
_size = st.sampled_from([1, 2, 4, 8, 16])
_bool = st.booleans()
_pointer = st.tuples(st.integers(0, 15), st.integers(0, 2), st.sampled_from([4, 4, 4, 5, 6]), st.integers(-16, 16))
_pointers = st.lists(_pointer, max_size=3)
_rewrite = st.none() | st.tuples(st.integers(1, 40), st.sampled_from(["avail_idx", "ring", "desc", "table"]),
                                 st.integers(0, 15), st.one_of(_u16, st.integers(0, (1 << 64) - 1)))


def _desc(draw, size: int) -> tuple[int, int, int, int]:
    """One descriptor, plausible most of the time (so chains get walked to their end and buffers
    get written), anything at all otherwise."""
    addr = draw(_buf_addr if draw(_d10) < 7 else odd_addr_st)
    length = draw(_short_len if draw(_d10) < 8 else odd_len_st)
    flags = draw(_flags if draw(_d10) < 8 else _odd_flags)
    nxt = draw(_index[size] if draw(_d10) < 9 else _u16)
    return addr, length, flags, nxt


@st.composite
def scenario(draw):
    size = draw(_size)
    descs = [_desc(draw, size) for _ in range(size)]
    tables = [[_desc(draw, 12) for _ in range(1 + draw(_index[12]))] for _ in range(draw(st.integers(0, 3)))]
    # some descriptors point at the indirect tables (length maybe wrong, flags maybe not just INDIRECT)
    pointers = [(slot % size, *rest) for slot, *rest in draw(_pointers)]
    plausible_ring = draw(_d10) < 8
    ring = [draw(_index[size] if plausible_ring else _u16) for _ in range(size)]
    last_avail = 0 if draw(_bool) else draw(_u16)
    avail_idx = (last_avail + draw(_upto[size] if draw(_d10) < 8 else _u16)) & 0xFFFF
    event_idx, indirect = draw(_bool), draw(_bool)
    used_event = draw(_u16)
    rewrite = draw(_rewrite)
    return size, descs, tables, pointers, ring, avail_idx, last_avail, event_idx, indirect, used_event, rewrite


def _writable_ranges(mem: HostileMemory, descs, tables) -> list[tuple[int, int]]:
    """Every range the guest described as device-writable, in any table (a superset of what
    the device may legitimately write into)."""
    out = []
    for addr, length, flags, _nxt in [*descs, *(d for t in tables for d in t)]:
        if flags & 2 and not flags & 4:
            out.append((addr, length))
    return out


def _offset(gpa: int) -> int | None:
    """Index of ``gpa`` in a :meth:`HostileMemory.snapshot`, or None outside RAM."""
    if 0 <= gpa < LOW:
        return gpa
    if HIGH <= gpa < TOP:
        return gpa - HIGH + LOW
    return None


def changed_outside(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    """Guest-physical addresses whose byte changed although no allowed range covers them."""
    expected = bytearray(before)
    for gpa, length in allowed:
        for lo, hi in ((0, LOW), (HIGH, TOP)):
            start, end = max(gpa, lo), min(gpa + length, hi)
            if start < end:
                i, j = _offset(start), _offset(end - 1)
                assert i is not None and j is not None
                expected[i:j + 1] = after[i:j + 1]
    if expected == after:
        return []
    bad = [i for i in range(len(after)) if expected[i] != after[i]][:8]
    return [i if i < LOW else i - LOW + HIGH for i in bad]


def run_scenario(sc) -> None:
    size, descs, tables, pointers, ring, avail_idx, last_avail, event_idx, indirect, used_event, rewrite = sc
    mem = MEM
    mem.fill(0, LOW)  # every example starts from the same memory, so a failure replays
    mem.fill(HIGH, LOW)
    table_addrs = [TABLES + 0x400 * t for t in range(len(tables))]
    descs = list(descs)
    for slot, which, flags, skew in pointers:
        if tables:
            t = which % len(tables)
            descs[slot] = (table_addrs[t], max(0, 16 * len(tables[t]) + skew), flags, 0)
    for t, table in enumerate(tables):
        for k, d in enumerate(table):
            mem.write(table_addrs[t] + 16 * k, struct.pack("<QIHH", *d))
    for k, d in enumerate(descs):
        mem.write(DESC + 16 * k, struct.pack("<QIHH", *d))
    for k, head in enumerate(ring):
        mem.write_u16(AVAIL + 4 + 2 * k, head)
    mem.write_u16(AVAIL + 2, avail_idx)
    mem.write_u16(AVAIL + 4 + 2 * size, used_event)

    allowed = [(USED, 6 + 8 * size), *_writable_ranges(mem, descs, tables)]
    mem.rewrite = None
    rewritten_desc = None
    if rewrite is not None:
        trigger, where, index, value = rewrite
        if where == "avail_idx":
            gpa, data = AVAIL + 2, struct.pack("<H", value & 0xFFFF)
        elif where == "ring":
            gpa, data = AVAIL + 4 + 2 * (index % size), struct.pack("<H", value & 0xFFFF)
        elif where == "desc":
            gpa, data = DESC + 16 * (index % size) + 8 * (index & 1), struct.pack("<Q", value)
        else:
            gpa, data = TABLES + 16 * (index % 12), struct.pack("<Q", value)
        mem.rewrite = (gpa, data)
        mem.trigger = trigger
        allowed.append((gpa, len(data)))
        if where in ("desc", "table"):  # the rewritten descriptor, checked once the run is over
            rewritten_desc = gpa - (gpa - (DESC if where == "desc" else TABLES)) % 16
    before = mem.snapshot()
    mem.reads = 0

    q = Virtqueue(mem, 0, 16)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.activate(event_idx, indirect)
    q.last_avail_idx = last_avail
    expected_used: list[tuple[int, int]] = []
    for _ in range(size + 2):
        mem.desc_reads = 0
        try:
            chain = q.pop()
        except VirtqueueError:
            break
        assert mem.desc_reads <= size + 12  # a bounded walk: the table, then at most one indirect table
        if chain is None:
            break
        assert 0 <= chain.head < size
        assert chain.read_len == sum(len(v) for v in chain.readable)
        assert chain.write_len == sum(len(v) for v in chain.writable)
        for v in chain.writable:
            v[:] = b"\xa5" * len(v)
        chain.release()
        try:
            q.push(chain.head, chain.write_len)
            q.should_notify()
            q.set_notification(True)
        except VirtqueueError:
            break
        expected_used.append((chain.head, chain.write_len))

    mem.rewrite = None
    after = mem.snapshot()
    if rewritten_desc is not None:
        # a descriptor the guest rewrote mid-walk may describe any buffer: allow what it says now
        a, n, f, _ = struct.unpack("<QIHH", mem.read(rewritten_desc, 16))
        if f & 2:
            allowed.append((a, n))
    bad = changed_outside(before, after, allowed)
    assert not bad, f"guest memory outside the chains changed at {[hex(b) for b in bad]}"
    # the used ring says exactly what the device did (unless a chain buffer overlapped the used ring)
    overlaps_used = any(a < USED + 6 + 8 * size and USED < a + n for a, n in allowed[1:])
    if not overlaps_used:
        used_idx = mem.read_u16(USED + 2)
        assert used_idx == len(expected_used)
        for k, (head, written) in enumerate(expected_used):
            assert struct.unpack("<II", mem.read(USED + 4 + 8 * (k % size), 8)) == (head, written)


def test_fuzz_virtqueue_chains(fuzz) -> None:
    fuzz.run("virtqueue-chains", scenario(), run_scenario)
