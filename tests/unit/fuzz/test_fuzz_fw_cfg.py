"""Fuzz target: the fw_cfg interface (selector, data port, DMA) against a model of QEMU's rules.

Hypothesis writes sequences of guest port accesses at any offset and width (selector writes with
any key, data reads of 1-8 bytes, DMA address writes as one 8-byte write or two 4-byte halves, or
any value at all) and places FWCfgDmaAccess descriptors in guest RAM with any control word, length
and address (in RAM, in the hole between the RAM regions, across a region's end, anything).  RAM
has two regions with a hole between them, so transfers that straddle it occur.

A model of the interface (docs/specs/fw_cfg.rst in QEMU) gives every read's value and every byte of
guest memory: asserted after each access, so the device may never write outside the transfer it
was asked for plus the descriptor's control word, never read a wrong byte, and never raise.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.memory import GuestMemory

LOW, HIGH = 1 << 20, 2 << 20
TOP = HIGH + LOW
MEM = GuestMemory(2 * LOW, split=(LOW, HIGH))
SIGNATURE = b"QEMU CFG"

FILES = {"etc/boot-order": b"/pci@i0cf8/disk@4\n", "etc/empty": b"", "opt/big": bytes(range(256)) * 20,
         "etc/e820": struct.pack("<QQI", 0, 1 << 20, 1)}
ITEMS = {0x05: struct.pack("<H", 2), 0x14: struct.pack("<I", 6), 0x15: b"quiet\0", 0x8003: b"e820" * 3}


def make_device() -> tuple[FwCfg, dict[int, bytes]]:
    fw = FwCfg(memory=MEM)
    for key, data in ITEMS.items():
        fw.add_item(key, data)
    for name, data in FILES.items():
        fw.add_file(name, data)
    keys = set(range(0x10000))
    items = {k: fw.item(k) for k in keys if fw.item(k) is not None}
    return fw, items  # type: ignore[return-value]


FW, ITEM_DATA = make_device()
KEYS = sorted(ITEM_DATA)


class Model:
    """What fw_cfg must do, written from the interface description, over a copy of guest RAM."""

    def __init__(self, ram: bytearray) -> None:
        self.ram = ram
        self.key, self.data, self.offset, self.high = 0, ITEM_DATA.get(0, b""), 0, 0

    def _idx(self, gpa: int, length: int) -> int | None:
        for base in (0, HIGH):
            if base <= gpa and gpa + length <= base + LOW and length >= 0:
                return gpa - base + (LOW if base else 0)
        return None

    def select(self, key: int) -> None:
        self.key = key & 0xFFFF
        self.data = ITEM_DATA.get(self.key & ~0x4000, b"")
        self.offset = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.offset:self.offset + n]
        self.offset = min(self.offset + n, len(self.data))
        return chunk.ljust(n, b"\0")

    def read(self, offset: int, size: int) -> int:
        if offset == 1:
            return int.from_bytes(self.take(size), "little")
        if offset == 0:
            return self.key & ((1 << (8 * size)) - 1)
        if 4 <= offset < 12:
            return int.from_bytes(SIGNATURE[offset - 4:offset - 4 + size].ljust(size, b"\0"), "little")
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.select(value & 0xFFFF)
        elif offset == 4 and size == 8:
            self.dma(int.from_bytes(value.to_bytes(8, "little"), "big"))
        elif offset == 4 and size == 4:
            self.high = int.from_bytes(value.to_bytes(4, "little"), "big")
        elif offset == 8 and size == 4:
            addr, self.high = (self.high << 32) | int.from_bytes(value.to_bytes(4, "little"), "big"), 0
            self.dma(addr)

    def dma(self, desc: int) -> None:
        i = self._idx(desc, 16)
        if i is None:
            return
        control, length, address = struct.unpack(">IIQ", self.ram[i:i + 16])
        if control & 0x08:
            self.select(control >> 16)
        status = 0
        if control & 0x02:
            if length:
                j = self._idx(address, length)
                if j is None:
                    status = 1
                else:
                    self.ram[j:j + length] = self.take(length)
        elif control & 0x10:
            status = 1
        elif control & 0x04:
            self.offset = min(self.offset + length, len(self.data))
        self.ram[i:i + 4] = struct.pack(">I", status)


def _snapshot() -> bytearray:
    return bytearray(MEM.read(0, LOW) + MEM.read(HIGH, LOW))


addr_st = st.one_of(st.integers(0x1000, 0x8000), st.integers(LOW - 40, LOW + 8), st.integers(HIGH - 8, HIGH + 64),
                    st.integers(TOP - 40, TOP + 8), st.integers(0, (1 << 64) - 1))
len_st = st.one_of(st.integers(0, 64), st.sampled_from([4, 16, 20, 5120, 5121, LOW, 0xFFFF_FFFF]),
                   st.integers(0, (1 << 32) - 1))
control_st = st.one_of(
    st.builds(lambda key, bits: (key << 16) | bits, st.sampled_from(KEYS) | st.integers(0, 0xFFFF),
              st.sampled_from([0x02, 0x0A, 0x04, 0x0C, 0x10, 0x18, 0x08, 0x00, 0x06, 0x12])),
    st.integers(0, 0xFFFF_FFFF))

op_st = st.one_of(
    st.tuples(st.just("select"), st.one_of(st.sampled_from(KEYS), st.integers(0, 0xFFFF)), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("read"), st.sampled_from([1, 1, 1, 0, 2, 3, 4, 5, 8, 11, 12]), st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("write"), st.integers(0, 12), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("place"), addr_st, control_st, len_st, addr_st),
    st.tuples(st.just("dma"), addr_st, st.sampled_from(["q", "halves", "high-only", "low-only"])),
)


def _compare(model: Model, after: object) -> None:
    now = _snapshot()
    if now != model.ram:
        bad = [i if i < LOW else i - LOW + HIGH for i in range(len(now)) if now[i] != model.ram[i]]
        raise AssertionError(f"after {after}: guest memory differs from the model at "
                             f"{[hex(b) for b in bad[:8]]} ({len(bad)} bytes)")


def run_ops(ops) -> None:
    MEM.fill(0, LOW, 0xEE)
    MEM.fill(HIGH, LOW, 0xEE)
    FW.reset()
    model = Model(_snapshot())
    last_desc = 0x1000
    for op in ops:
        kind = op[0]
        if kind == "select":
            _, key, size = op
            FW.io_write(0, size, key & ((1 << (8 * size)) - 1))
            model.write(0, size, key & ((1 << (8 * size)) - 1))
        elif kind == "read":
            _, offset, size = op
            got = FW.io_read(offset, size)
            want = model.read(offset, size)
            assert got == want, f"read at +{offset} size {size}: {got:#x}, expected {want:#x}"
        elif kind == "write":
            _, offset, size, value = op
            value &= (1 << (8 * size)) - 1
            FW.io_write(offset, size, value)
            model.write(offset, size, value)
        elif kind == "place":  # the guest writes a descriptor into its RAM
            _, gpa, control, length, address = op
            raw = struct.pack(">IIQ", control, length, address)
            if MEM.contains(gpa, 16):
                MEM.write(gpa, raw)
                i = model._idx(gpa, 16)
                assert i is not None
                model.ram[i:i + 16] = raw
                last_desc = gpa
        else:
            _, gpa, how = op
            gpa = last_desc if gpa % 3 else gpa  # mostly the descriptor the guest just placed
            gpa &= (1 << 64) - 1
            hi = int.from_bytes((gpa >> 32).to_bytes(4, "big"), "little")
            lo = int.from_bytes((gpa & 0xFFFF_FFFF).to_bytes(4, "big"), "little")
            writes = {"q": [(4, 8, int.from_bytes(gpa.to_bytes(8, "big"), "little"))],
                      "halves": [(4, 4, hi), (8, 4, lo)], "high-only": [(4, 4, hi)], "low-only": [(8, 4, lo)]}[how]
            for offset, size, value in writes:
                FW.io_write(offset, size, value)
                model.write(offset, size, value)
        if kind == "dma" or (kind == "write" and 4 <= op[1] < 12):
            _compare(model, op)
    _compare(model, "the last access")
    # the device still answers: the signature through the data port and the DMA signature
    FW.io_write(0, 2, 0)
    assert bytes(FW.io_read(1, 1) for _ in range(4)) == b"QEMU"
    assert FW.io_read(4, 8).to_bytes(8, "little") == SIGNATURE


def test_fuzz_fw_cfg(fuzz) -> None:
    fuzz.run("fw_cfg", st.lists(op_st, min_size=5, max_size=60), run_ops)
