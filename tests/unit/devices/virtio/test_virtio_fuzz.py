"""Property test: random rings and descriptors never crash, hang or escape guest RAM.

Hypothesis builds descriptor tables (structured, so chains, indirect tables and
loops actually occur), random avail rings and indices, and random bytes
elsewhere, then drives :class:`Virtqueue` like a device would.  Asserted:
only :class:`VirtqueueError` escapes; every buffer handed out lies in RAM;
each walk reads a bounded number of descriptors (so it terminates).
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.devices.virtio.queue import MAX_CHAIN_BYTES, Virtqueue, VirtqueueError
from pyvmm.memory import GuestMemory

RAM = 1 << 20
ARENA = 0x10000  # rings and tables live in the first 64 KiB, buffers anywhere


class SpyMemory(GuestMemory):
    """Records every access; checks each one that succeeded really was inside RAM."""

    def __init__(self) -> None:
        super().__init__(RAM)
        self.reads = 0
        self.views: list[tuple[int, int]] = []

    def _check(self, gpa: int, length: int) -> None:
        assert 0 <= gpa and gpa + length <= RAM, f"access {gpa:#x}+{length:#x} escaped RAM"

    def read(self, gpa: int, length: int) -> bytes:
        data = super().read(gpa, length)
        self._check(gpa, length)
        self.reads += 1
        return data

    def view(self, gpa: int, length: int) -> memoryview:
        v = super().view(gpa, length)
        self._check(gpa, length)
        self.views.append((gpa, length))
        return v

    def write(self, gpa: int, data) -> None:
        super().write(gpa, data)
        self._check(gpa, len(data))


MEM = SpyMemory()

addr_st = st.one_of(st.integers(0, RAM - 1), st.integers(RAM - 64, RAM + 64), st.integers(0, (1 << 64) - 1))
len_st = st.one_of(st.integers(0, 4096), st.integers(0, (1 << 32) - 1), st.sampled_from([16, 32, 48, 0xFFFF_FFF0]))
flags_st = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
desc_st = st.tuples(addr_st, len_st, flags_st, st.integers(0, 40))


@st.composite
def scenario(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    descs = draw(st.lists(desc_st, min_size=size, max_size=size))
    # indirect tables: random descriptors at fixed places in the arena, pointed at by some descs
    tables = draw(st.lists(st.lists(desc_st, min_size=1, max_size=12), max_size=3))
    avail_ring = draw(st.lists(st.integers(0, 0xFFFF), min_size=size + 1, max_size=size + 1))
    avail_idx = draw(st.integers(0, 0xFFFF))
    last_avail = draw(st.one_of(st.just(0), st.integers(0, 0xFFFF)))
    event_idx = draw(st.booleans())
    indirect = draw(st.booleans())
    noise = draw(st.binary(min_size=0, max_size=256))
    point_at_tables = draw(st.lists(st.integers(0, size - 1), max_size=3))
    return size, descs, tables, avail_ring, avail_idx, last_avail, event_idx, indirect, noise, point_at_tables


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_random_rings(sc):
    run_scenario(sc)


def _random_scenario(rng: random.Random):
    """The same shape as :func:`scenario` from a seeded PRNG, biased towards plausible rings so
    that many chains are walked to the end (many more cases per second than hypothesis)."""
    def addr():
        r = rng.random()
        if r < 0.75:
            return rng.randrange(0x10000, RAM - 0x2000)
        return rng.choice([rng.randrange(RAM - 64, RAM + 64), rng.getrandbits(64),
                           0x4000 + rng.randrange(0, 0x800, 16)])

    def length():
        r = rng.random()
        if r < 0.8:
            return rng.randrange(0, 2048)
        return rng.choice([rng.getrandbits(32), 16, 32, 48, 0xFFFF_FFF0])

    def desc(size):
        flags = rng.choice([0, 1, 2, 3, 1, 3, 4]) if rng.random() < 0.95 else rng.getrandbits(16)
        nxt = rng.randrange(size) if rng.random() < 0.9 else rng.randrange(41)
        return (addr(), length(), flags, nxt)

    size = rng.choice([1, 2, 4, 8, 16])
    tables = [[desc(12) for _ in range(rng.randrange(1, 13))] for _ in range(rng.randrange(4))]
    avail_idx = rng.randrange(size + 1) if rng.random() < 0.85 else rng.getrandbits(16)
    return (size, [desc(size) for _ in range(size)], tables,
            [rng.randrange(size) if rng.random() < 0.9 else rng.getrandbits(16) for _ in range(size + 1)],
            avail_idx, 0, rng.random() < 0.5, rng.random() < 0.7, rng.randbytes(rng.randrange(256)),
            [rng.randrange(size) for _ in range(rng.randrange(4))])


def test_random_rings_seeded_bulk():
    rng = random.Random(0x5EED)
    for _ in range(3000):
        run_scenario(_random_scenario(rng))


def run_scenario(sc):
    size, descs, tables, avail_ring, avail_idx, last_avail, event_idx, indirect, noise, point = sc
    mem = MEM
    mem.fill(0, ARENA)
    desc_addr, avail_addr, used_addr, table_base = 0x1000, 0x2000, 0x3000, 0x4000
    mem.write(0x8000, noise)
    table_addrs = []
    for t, table in enumerate(tables):
        ta = table_base + t * 0x400
        for k, d in enumerate(table):
            mem.write(ta + 16 * k, struct.pack("<QIHH", *d))
        table_addrs.append((ta, 16 * len(table)))
    for k, d in enumerate(descs):
        mem.write(desc_addr + 16 * k, struct.pack("<QIHH", *d))
    for j, slot in enumerate(point):
        if table_addrs:
            ta, tl = table_addrs[j % len(table_addrs)]
            mem.write(desc_addr + 16 * slot, struct.pack("<QIHH", ta, tl, 4, 0))
    for k, v in enumerate(avail_ring):
        mem.write_u16(avail_addr + 4 + 2 * k, v)
    mem.write_u16(avail_addr + 2, avail_idx)

    q = Virtqueue(mem, 0, 16)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = desc_addr, avail_addr, used_addr
    q.activate(event_idx, indirect)
    q.last_avail_idx = last_avail

    for _ in range(size + 2):
        mem.reads = 0
        mem.views.clear()
        try:
            chain = q.pop()
        except VirtqueueError:
            break
        # bounded walk: at most size direct + 12 indirect descriptors (+ ring reads)
        assert mem.reads <= size + 16 + 4
        if chain is None:
            break
        assert chain.read_len + chain.write_len <= MAX_CHAIN_BYTES
        assert chain.head < size
        for gpa, length in mem.views:
            assert gpa + length <= RAM
        chain.release()
        try:
            q.push(chain.head, chain.write_len)
            q.should_notify()
            q.set_notification(True)
        except VirtqueueError:
            break


@settings(max_examples=200, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
       st.integers(0, 1 << 16))
def test_random_ring_addresses_validate(desc, avail, used, size):
    q = Virtqueue(MEM, 0, 256)
    q.desc_addr, q.avail_addr, q.used_addr, q.size = desc, avail, used, size
    try:
        q.validate()
    except VirtqueueError:
        return
    assert MEM.contains(desc, 16 * size) and MEM.contains(used, 6 + 8 * size)


# -- register-level fuzz: a guest poking the MMIO window must never make a device raise -------------

_REG_OFFSETS = [0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60, 0x64,
                0x70, 0x80, 0x84, 0x90, 0x94, 0xA0, 0xA4, 0xAC, 0xB0, 0xFC, 0x100, 0x104, 0x108, 0x130, 0x1FF]


@st.composite
def mmio_ops(draw):
    ops = []
    for _ in range(draw(st.integers(1, 60))):
        off = draw(st.one_of(st.sampled_from(_REG_OFFSETS), st.integers(0, 0x1FF)))
        size = draw(st.sampled_from([1, 2, 4, 8]))
        value = draw(st.one_of(st.integers(0, 16), st.sampled_from([0xF, 0xB, 0x1000, 0x2000, 0x3000, 8, 4]),
                               st.integers(0, (1 << 64) - 1)))
        ops.append((draw(st.booleans()), off, size, value))
    return ops


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mmio_ops(), st.sampled_from(["blk", "rng", "console"]))
def test_random_register_accesses(tmp_path_factory, ops, kind):
    from pyvmm.block.raw import RawImage
    from pyvmm.devices.virtio.blk import VirtioBlk
    from pyvmm.devices.virtio.console import VirtioConsole
    from pyvmm.devices.virtio.mmio import VirtioMmio
    from pyvmm.devices.virtio.rng import VirtioRng

    mem = MEM
    # a plausible ring at 0x1000/0x2000/0x3000 with random contents, so kicks walk something
    mem.write(0x1000, random.Random(len(ops)).randbytes(0x3000))
    if kind == "blk":
        img = tmp_path_factory.getbasetemp() / "fuzz.img"
        if not img.exists():
            img.write_bytes(bytes(1 << 16))
        dev = VirtioBlk(mem, RawImage(str(img)))
    elif kind == "rng":
        dev = VirtioRng(mem)
    else:
        dev = VirtioConsole(mem, None)
    t = VirtioMmio(dev, None)
    try:
        for is_write, off, size, value in ops:
            if is_write:
                t.io_write(off, size, value & ((1 << (8 * size)) - 1))
            else:
                v = t.io_read(off, size)
                assert 0 <= v < (1 << (8 * size))
    finally:
        t.close()
