"""MP table: parsed back the way Linux's mpparse does (scan, checksums, entries)."""

from __future__ import annotations

import struct

import pytest

from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.mptable import write_mptable

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def scan_floating_pointer(mem: GuestMemory) -> int:
    """Search the regions Linux searches, on 16-byte boundaries, for a valid "_MP_" structure."""
    for base, length in ((0, 0x400), (639 * 0x400, 0x400), (0xF0000, 0x10000)):
        for addr in range(base, base + length, 16):
            blob = mem.read(addr, 16)
            if blob[:4] == b"_MP_" and blob[8] == 1 and sum(blob) & 0xFF == 0:
                return addr
    raise AssertionError("no MP floating pointer found")


def parse(mem: GuestMemory) -> dict:
    fp = scan_floating_pointer(mem)
    blob = mem.read(fp, 16)
    physptr = struct.unpack_from("<I", blob, 4)[0]
    assert blob[9] == 4  # spec 1.4
    assert blob[11] == 0  # feature1: config table present (no default config)
    hdr = mem.read(physptr, 44)
    assert hdr[:4] == b"PCMP"
    length, spec = struct.unpack_from("<HB", hdr, 4)
    assert spec == 4
    table = mem.read(physptr, length)
    assert sum(table) & 0xFF == 0, "config table checksum"
    count, lapic = struct.unpack_from("<HI", hdr, 34)
    assert lapic == 0xFEE00000
    off = 44
    entries = []
    for _ in range(count):
        t = table[off]
        size = ENTRY_SIZES[t]
        entries.append(table[off:off + size])
        off += size
    assert off == length, "entry count and table length agree"
    return {"fp": fp, "entries": entries}


@pytest.mark.parametrize("ncpus", [1, 2, 8, 64, 254])
def test_mptable_round_trip(ncpus):
    mem = GuestMemory(16 << 20)
    addr = write_mptable(mem, ncpus)
    t = parse(mem)
    assert t["fp"] == addr == layout.MPTABLE_START
    cpus = [e for e in t["entries"] if e[0] == 0]
    assert [e[1] for e in cpus] == list(range(ncpus))
    assert all(e[3] & 1 for e in cpus), "all CPUs enabled"
    assert [bool(e[3] & 2) for e in cpus] == [True] + [False] * (ncpus - 1), "CPU 0 is the only BSP"
    buses = [e for e in t["entries"] if e[0] == 1]
    assert buses == [bytes([1, 0]) + b"ISA   "]
    ioapics = [e for e in t["entries"] if e[0] == 2]
    assert len(ioapics) == 1
    assert ioapics[0][1] == ncpus and ioapics[0][3] & 1
    assert struct.unpack_from("<I", ioapics[0], 4)[0] == 0xFEC00000
    # I/O interrupts: (irqtype, srcirq) -> pin on the I/O APIC.
    ioints = {}
    for e in t["entries"]:
        if e[0] == 3:
            irqtype, flags, bus, srcirq, apic, pin = struct.unpack("<BHBBBB", e[1:])
            assert bus == 0 and apic == ncpus and flags == 0
            ioints[(irqtype, srcirq)] = pin
    assert ioints[(0, 0)] == 2, "timer IRQ0 on pin 2"
    assert ioints[(3, 0)] == 0, "8259 ExtINT on pin 0"
    for irq in list(range(1, 2)) + list(range(3, 16)):
        assert ioints[(0, irq)] == irq
    assert (0, 2) not in ioints
    lints = sorted((e[1], e[7]) for e in t["entries"] if e[0] == 4)
    assert lints == [(1, 1), (3, 0)]  # NMI on LINT1, ExtINT on LINT0
    assert all(e[6] == 0xFF for e in t["entries"] if e[0] == 4)


@pytest.mark.parametrize("bad", [0, -1, 255, 1000])
def test_mptable_rejects_bad_cpu_counts(bad):
    with pytest.raises(ConfigError):
        write_mptable(GuestMemory(16 << 20), bad)


def test_mptable_rejects_misaligned_address():
    with pytest.raises(ConfigError):
        write_mptable(GuestMemory(16 << 20), 2, addr=0xF0008)


def test_mptable_in_ebda():
    mem = GuestMemory(16 << 20)
    write_mptable(mem, 4, addr=layout.EBDA_START)
    assert parse(mem)["fp"] == layout.EBDA_START
