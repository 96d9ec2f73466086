"""PCI host bridge: config mechanism #1, BAR sizing/programming/mapping, capabilities, INTx, MSI-X."""

from __future__ import annotations

import struct

import pytest

from pyvmm.bus import Bus
from pyvmm.devices.pci.config import BarKind, BarSpec
from pyvmm.devices.pci.host import PciDevice, PciHost
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from support.pci_driver import GuestPci, RecordingLine


class Dev(PciDevice):
    """A test function with an I/O BAR, a 32-bit BAR, a 64-bit BAR and MSI-X in BAR 2."""

    def __init__(self, sender=None) -> None:
        super().__init__("testdev", vendor=0x1234, device=0x5678, class_code=0xFF0000,
                         bars=[BarSpec(0, 0x20, BarKind.IO), BarSpec(1, 0x1000), BarSpec(2, 0x4000, BarKind.MEM64)])
        self.regs = {}
        if sender is not None:
            self.add_msix(4, 2, 0x0, 0x800, sender)

    def bar_read(self, bar, offset, size):
        if bar == 2:
            return super().bar_read(bar, offset, size)
        return self.regs.get((bar, offset), 0xAB)

    def bar_write(self, bar, offset, size, value):
        if bar == 2:
            return super().bar_write(bar, offset, size, value)
        self.regs[(bar, offset)] = value


@pytest.fixture
def machine():
    mem = GuestMemory(64 << 20)
    io, mmio = Bus("io"), Bus("mmio")
    lines = {}

    def line(gsi):
        return lines.setdefault(gsi, RecordingLine(gsi))

    msis = []
    host = PciHost(mem, mmio, io, line, msi_sender=lambda a, d: msis.append((a, d)))
    yield mem, io, mmio, host, lines, msis
    mem.close()


def test_enumerate_and_absent_functions(machine):
    mem, io, mmio, host, lines, msis = machine
    dev = Dev()
    slot = host.add(dev, slot=3)
    pci = GuestPci(io, mmio)
    assert pci.enumerate() == {0: (0x8086, 0x29C0), 3: (0x1234, 0x5678)}
    assert pci.cfg_read(3, 0x08) >> 8 == 0xFF0000  # class code
    assert pci.cfg_read(3, 0, fn=1) == 0xFFFF_FFFF and pci.cfg_read(3, 0, bus=1) == 0xFFFF_FFFF
    # byte/word reads at 0xcfc-0xcff
    assert pci.cfg_read(slot, 0x02, 2) == 0x5678 and pci.cfg_read(slot, 0x03, 1) == 0x56
    # disabled address -> all ones; byte write to 0xcf8 is not an address write
    io.write(0xCF8, 4, 3 << 11)
    assert io.read(0xCFC, 4) == 0xFFFF_FFFF
    io.write(0xCF8, 4, (1 << 31) | (3 << 11))
    io.write(0xCF9, 1, 0x06)
    assert io.read(0xCF8, 4) == (1 << 31) | (3 << 11)
    assert io.read(0xCFC, 4) == 0x5678_1234
    # unaligned data-port access -> all ones / ignored
    assert io.read(0xCFD, 2) == 0xFFFF
    # INTx routed as the DSDT says: slot 3 INTA -> intx_gsis[3]
    assert pci.cfg_read(slot, 0x3D, 1) == 1 and dev.intx_line.gsi == 19
    with pytest.raises(ConfigError):
        host.add(Dev(), slot=3)
    with pytest.raises(ConfigError):
        host.add(Dev(), slot=40)


def test_read_only_fields_are_protected(machine):
    mem, io, mmio, host, lines, msis = machine
    host.add(Dev(), slot=1)
    pci = GuestPci(io, mmio)
    pci.cfg_write(1, 0x00, 4, 0)
    pci.cfg_write(1, 0x08, 4, 0)
    pci.cfg_write(1, 0x34, 1, 0x80)
    assert pci.cfg_read(1, 0) == 0x5678_1234 and pci.cfg_read(1, 0x08) >> 8 == 0xFF0000
    pci.cfg_write(1, 0x04, 2, 0xFFFF)
    assert pci.cfg_read(1, 0x04, 2) == 0x0407  # IO, MEM, MASTER, INTX_DISABLE only
    pci.cfg_write(1, 0x3C, 1, 0x55)
    assert pci.cfg_read(1, 0x3C, 1) == 0x55


def test_bar_sizing_programming_and_mapping(machine):
    mem, io, mmio, host, lines, msis = machine
    dev = Dev()
    host.add(dev, slot=2)
    pci = GuestPci(io, mmio)
    assert pci.size_bar(2, 0) == (0x20, 1)
    assert pci.size_bar(2, 1) == (0x1000, 0)
    assert pci.size_bar(2, 2) == (0x4000, 4)
    assert pci.size_bar(2, 4) == (0, 0) and pci.size_bar(2, 5) == (0, 0)
    assert dev.mapped_bars() == {}
    # program, then enable decoding: ranges appear on the buses
    pci.cfg_write(2, 0x10, 4, 0xC000)
    pci.cfg_write(2, 0x14, 4, 0xE000_0000)
    pci.cfg_write(2, 0x18, 4, 0xE010_0000)
    pci.cfg_write(2, 0x1C, 4, 0)
    assert mmio.read(0xE000_0000, 4) == 0xFFFF_FFFF  # not decoded yet
    pci.cfg_write(2, 0x04, 2, 0x3)
    assert dev.mapped_bars() == {0: 0xC000, 1: 0xE000_0000, 2: 0xE010_0000}
    mmio.write(0xE000_0008, 4, 0x1234)
    assert dev.regs[(1, 8)] == 0x1234 and mmio.read(0xE000_0008, 4) == 0x1234
    io.write(0xC004, 1, 7)
    assert dev.regs[(0, 4)] == 7
    # move BAR 1 while decoding: old range gone, new one live
    pci.cfg_write(2, 0x14, 4, 0xE020_0000)
    assert mmio.read(0xE000_0008, 4) == 0xFFFF_FFFF
    assert mmio.read(0xE020_0008, 4) == 0x1234
    # sizing with decoding on must not leave a bogus mapping behind
    assert pci.size_bar(2, 1) == (0x1000, 0) and dev.mapped_bars()[1] == 0xE020_0000
    # hostile addresses: over RAM, over another BAR, 64-bit BAR above 4 GiB is fine on the bus
    pci.cfg_write(2, 0x14, 4, 0x0010_0000)
    assert 1 not in dev.mapped_bars()
    pci.cfg_write(2, 0x14, 4, 0xE010_0000)  # overlaps BAR 2
    assert 1 not in dev.mapped_bars()
    pci.cfg_write(2, 0x1C, 4, 0x1)
    assert dev.mapped_bars()[2] == 0x1_E010_0000
    pci.cfg_write(2, 0x14, 4, 0xE020_0000)
    assert dev.mapped_bars()[1] == 0xE020_0000
    # disabling memory decoding unmaps memory BARs only
    pci.cfg_write(2, 0x04, 2, 0x1)
    assert dev.mapped_bars() == {0: 0xC000}
    dev.reset()
    assert dev.mapped_bars() == {} and pci.cfg_read(2, 0x14) == 0 and pci.cfg_read(2, 0x04, 2) == 0


def test_firmware_assignment(machine):
    mem, io, mmio, host, lines, msis = machine
    a, b = Dev(), Dev()
    host.add(a)
    host.add(b)
    host.assign_resources()
    bars = list(a.mapped_bars().items()) + list(b.mapped_bars().items())
    assert len(bars) == 6
    for _i, base in bars:
        assert base < 0x10000 or 0xC000_0000 <= base < 0xFEA0_0000
    ranges = sorted((s, e) for s, e, _ in mmio.ranges())
    assert all(e1 <= s2 for (_s1, e1), (s2, _e2) in zip(ranges, ranges[1:], strict=False))


def test_capabilities_and_msix(machine):
    mem, io, mmio, host, lines, msis = machine
    dev = Dev(sender=host.send_msi)
    host.add(dev, slot=1)
    host.assign_resources()
    pci = GuestPci(io, mmio)
    caps = pci.caps(1)
    assert [c for _, c in caps] == [0x11]
    cap = caps[0][0]
    assert pci.cfg_read(1, cap + 2, 2) == 3  # 4 vectors
    assert pci.cfg_read(1, cap + 4) == 2 and pci.cfg_read(1, cap + 8) == 0x802
    table = dev.mapped_bars()[2]
    # all vectors start masked; MSI-X disabled -> notify refuses (caller falls back to INTx)
    assert mmio.read(table + 12, 4) == 1
    assert dev.msix.notify(0) is False
    pci.cfg_write(1, cap + 2, 2, 0x8000)
    mmio.write(table + 16, 4, 0xFEE0_0000)
    mmio.write(table + 20, 4, 0)
    mmio.write(table + 24, 4, 0x4041)
    assert dev.msix.notify(1) is True and msis == []  # masked -> pending
    assert mmio.read(table + 0x800, 4) == 0b10
    mmio.write(table + 28, 4, 0)  # unmask -> pending message delivered
    assert msis == [(0xFEE0_0000, 0x4041)] and mmio.read(table + 0x800, 4) == 0
    dev.msix.notify(1)
    assert len(msis) == 2
    # function mask holds messages; clearing it delivers them
    pci.cfg_write(1, cap + 2, 2, 0xC000)
    dev.msix.notify(1)
    assert len(msis) == 2
    pci.cfg_write(1, cap + 2, 2, 0x8000)
    assert len(msis) == 3
    # hostile accesses: bad vector, odd sizes, PBA writes, past the table
    assert dev.msix.notify(99) is False and dev.msix.notify(-1) is False
    mmio.write(table + 0x800, 4, 0xFFFF_FFFF)
    assert mmio.read(table + 0x800, 4) == 0
    mmio.write(table + 3, 1, 0xFF)
    mmio.write(table + 0x40, 4, 0xFFFF)  # beyond 4 entries
    assert mmio.read(table + 0x40, 4) == 0 and mmio.read(table + 2, 2) == 0
    assert mmio.read(table + 16, 8) == 0xFEE0_0000


def test_intx_and_disable_bit(machine):
    mem, io, mmio, host, lines, msis = machine
    dev = Dev()
    host.add(dev, slot=1)
    pci = GuestPci(io, mmio)
    line = dev.intx_line
    assert line.gsi == 17
    dev.set_intx(True)
    assert line.level and pci.cfg_read(1, 0x06, 2) & 0x8
    pci.cfg_write(1, 0x04, 2, 0x400)
    assert not line.level and pci.cfg_read(1, 0x06, 2) & 0x8
    pci.cfg_write(1, 0x04, 2, 0)
    assert line.level
    dev.set_intx(False)
    assert not line.level and not pci.cfg_read(1, 0x06, 2) & 0x8


def test_config_space_fuzz(machine):
    """Random guest config/BAR traffic never raises and never maps a BAR over RAM."""
    import random

    mem, io, mmio, host, lines, msis = machine
    dev = Dev(sender=host.send_msi)
    host.add(dev, slot=1)
    rng = random.Random(4)
    for _ in range(20000):
        port = rng.choice((0xCF8, 0xCF8, 0xCFC, 0xCFD, 0xCFE, 0xCFF))
        size = rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            io.write(port, size, rng.getrandbits(32) | (1 << 31 if port == 0xCF8 and rng.random() < 0.9 else 0)
                     if port != 0xCF8 else (1 << 31) | (rng.choice((0, 1, 2)) << 11) | rng.randrange(256))
        else:
            io.read(port, size)
        for base in dev.mapped_bars().values():
            assert not mem.contains(base, 1)
    for base in dev.mapped_bars().values():
        mmio.read(base, 4)
    assert struct.calcsize("<I") == 4


def test_sizing_does_not_touch_the_bus_and_stale_windows_make_way(machine):
    mem, io, mmio, host, lines, msis = machine
    a, b = Dev(), Dev()
    host.add(a, slot=1)
    host.add(b, slot=2)
    host.assign_resources()
    pci = GuestPci(io, mmio)
    calls = []
    orig_register, orig_unregister = mmio.register, mmio.unregister
    mmio.register = lambda *args, **kw: (calls.append("reg"), orig_register(*args, **kw))[1]
    mmio.unregister = lambda *args, **kw: (calls.append("unreg"), orig_unregister(*args, **kw))[1]
    # Linux-style sizing: decoding off, all-ones, restore, decoding on -> no bus changes at all
    a_bar1 = a.mapped_bars()[1]
    pci.cfg_write(1, 0x04, 2, 0x1)
    assert mmio.read(a_bar1, 4) == 0xFFFF_FFFF and a.mapped_bars().get(1) is None  # not decoded
    assert pci.size_bar(1, 1) == (0x1000, 0)
    pci.cfg_write(1, 0x04, 2, 0x3)
    assert calls == [] and a.mapped_bars()[1] == a_bar1
    mmio.write(a_bar1 + 4, 4, 9)
    assert a.regs[(1, 4)] == 9
    # A stops decoding; B moves onto A's old address: A's stale window makes way
    pci.cfg_write(1, 0x04, 2, 0x1)
    pci.cfg_write(2, 0x14, 4, a_bar1)
    assert b.mapped_bars()[1] == a_bar1 and 1 not in a.mapped_bars()
    mmio.write(a_bar1 + 4, 4, 7)
    assert b.regs[(1, 4)] == 7 and a.regs[(1, 4)] == 9
    # A decoding again at the same address: B holds it, so A's BAR 1 stays off the bus
    pci.cfg_write(1, 0x04, 2, 0x3)
    assert 1 not in a.mapped_bars() and b.mapped_bars()[1] == a_bar1


def test_userspace_irqchip_delivers_msis_as_the_apic_bus():
    """tcg's MSI sink: the irqchip decodes x86 MSI address/data itself; guest-chosen bad messages are dropped."""
    from pyvmm.devices.irqchip import UserspaceIrqchip
    from pyvmm.devices.lapic import Reg as LapicReg

    chip = UserspaceIrqchip(2, 1_000_000_000)
    send = chip.deliver_msi
    for lapic in chip.lapics:
        lapic.write_reg(LapicReg.SVR, 0x1FF)
    send(0xFEE0_1000, 0x45)  # physical destination APIC 1, fixed, vector 0x45
    assert chip.lapics[1].irr >> 0x45 & 1 and not chip.lapics[0].irr >> 0x45 & 1
    send(0xFEEF_F000, 0x46)  # broadcast
    assert all(la.irr >> 0x46 & 1 for la in chip.lapics)
    send(0xFEE0_0000, 0x147)  # lowest priority: one CPU
    assert sum(la.irr >> 0x47 & 1 for la in chip.lapics) == 1
    send(0xC000_0000, 0x48)  # not the APIC window
    send(0x1_FEE0_0000, 0x48)  # above 4 GiB
    send(0xFEE0_0000, 0x448)  # SMI delivery mode: not supported
    assert not any(la.irr >> 0x48 & 1 for la in chip.lapics)
    assert chip.counters["msi_dropped"] == 3 and chip.counters["msi"] == 3
