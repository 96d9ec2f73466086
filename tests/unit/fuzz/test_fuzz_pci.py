"""Fuzz target: PCI configuration space and BAR sizing/programming, through the 0xcf8/0xcfc ports.

The machine has the host bridge, a test function with an I/O BAR, a 32-bit BAR and a 64-bit BAR
holding MSI-X, a virtio-pci device (virtio-rng with MSI-X and the virtio capabilities, including
the PCI_CFG access window), fixed devices on both buses, and RAM.  Hypothesis writes sequences of
configuration cycles (any bus/slot/function/register/width/byte lane, biased to the command
register, the BARs and the capabilities; values such as all-ones for sizing, addresses in the PCI
window, over RAM, over the fixed devices, over the config ports themselves, 64-bit halves, or
anything), raw writes to 0xcf8-0xcff, accesses inside wherever the BARs are now decoded, and
machine resets, optionally after firmware assigned resources.

Asserted after every step: no exception; read-only fields and the capability chain are intact;
every BAR register keeps its flag bits and is aligned to its size; a BAR is decoded exactly when
its enable bit is set and its address is usable (not zero, not over RAM, below 4 GiB for 32-bit
BARs, inside the port space for I/O), and then the bus routes its range to it; the config ports and
the fixed devices are never displaced.  At the end the machine is reset, firmware assigns
resources again and every device answers as at the start.
"""

from __future__ import annotations

from hypothesis import strategies as st

from pyvmm.bus import Bus
from pyvmm.devices.pci.config import BarKind, BarSpec, Reg
from pyvmm.devices.pci.host import PciDevice, PciHost
from pyvmm.devices.virtio.pci import REGS_BAR, VirtioPci
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from support.pci_driver import GuestPci, RecordingLine

MEM = GuestMemory(64 << 20)
FIXED_MMIO = (0xFEC0_0000, 0x1000)
FIXED_IO = (0x3F8, 8)


class Fixed:
    def io_read(self, offset: int, size: int) -> int:
        return 0x5A

    def io_write(self, offset: int, size: int, value: int) -> None:
        pass


class FuzzFunction(PciDevice):
    def __init__(self, sender) -> None:
        super().__init__("fuzzdev", vendor=0x1234, device=0x5678, class_code=0xFF0000,
                         bars=[BarSpec(0, 0x20, BarKind.IO), BarSpec(1, 0x1000),
                               BarSpec(2, 0x4000, BarKind.MEM64, prefetchable=True)])
        self.add_msix(4, 2, 0x0, 0x800, sender)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return super().bar_read(bar, offset, size) if bar == 2 else 0xAB


def build():
    io, mmio = Bus("io"), Bus("mmio")
    fixed = Fixed()
    mmio.register(*FIXED_MMIO, fixed, "fixed-mmio")
    io.register(*FIXED_IO, fixed, "fixed-io")
    msis: list[tuple[int, int]] = []
    lines: dict[int, RecordingLine] = {}
    host = PciHost(MEM, mmio, io, lambda gsi: lines.setdefault(gsi, RecordingLine(gsi)),
                   msi_sender=lambda a, d: msis.append((a, d)))
    host.add(FuzzFunction(host.send_msi), slot=3)
    host.add(VirtioPci(VirtioRng(MEM), msix=True, msi_sender=host.send_msi), slot=4)
    return io, mmio, host, fixed


def protected(dev: PciDevice) -> dict[int, int]:
    """Offsets of bytes no guest write may change, with their values."""
    cfg = dev.config
    offs = [*range(0x00, 0x04), *range(0x08, 0x0C), 0x0E, *range(0x2C, 0x30), 0x34, 0x3D]
    for off, _cap in cfg.capabilities():
        offs += [off, off + 1]
    return {o: cfg.data[o] for o in offs}


IO0, MMIO0, HOST0, _ = build()
PROTECTED = {slot: protected(dev) for slot, dev in HOST0.devices.items()}
IDS = {slot: dev.config.get(0, 4) for slot, dev in HOST0.devices.items()}

window = HOST0.windows
value_st = st.one_of(
    st.just(0xFFFF_FFFF), st.just(0),
    st.integers(window.mem32_base >> 12, window.mem32_limit >> 12).map(lambda p: p << 12),
    st.integers(window.io_base >> 5, window.io_limit >> 5).map(lambda p: p << 5),
    st.integers(0, (64 << 20) >> 12).map(lambda p: p << 12),  # over RAM
    st.sampled_from([0x100000, 0x1000, 0xFEC0_0000, 0x3F8, 0x3E0, 0xCF8, 0xCE0, 0xCC0, 0x1, 0x7, 0x3, 0xFFFF_FFF0,
                     0xFFFF_0000, 0xFFF0, 0x1_0000, 0x0000_0001, 0x8000_0000]),
    st.integers(0, 0xFFFF_FFFF))
reg_st = st.sampled_from([0x04, 0x04, 0x06, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30, 0x3C, -1, -1, -2]).flatmap(
    lambda r: st.just(r) if r >= 0 else st.integers(0x40, 0xFF) if r == -1 else st.integers(0, 0xFF))
addr_st = st.tuples(st.sampled_from([0, 3, 3, 3, 4, 4, 4, 5, -1]).flatmap(lambda s: st.just(s) if s >= 0
                                                                        else st.integers(0, 31)),
                    st.sampled_from([0, 0, 0, 0, 0, 1, 255]), st.sampled_from([0, 0, 0, 0, 0, 1, 7]))
@st.composite
def op_st(draw):
    """One guest step; configuration writes are the most common (sampled_from weighs, one_of does not)."""
    kind = draw(st.sampled_from(["cfg-write"] * 6 + ["cfg-read"] * 2 + ["port", "bar", "bar", "reset"]))
    if kind == "cfg-write":
        return kind, draw(addr_st), draw(reg_st), draw(st.sampled_from([4, 4, 2, 1])), draw(st.integers(0, 3)), \
            draw(value_st)
    if kind == "cfg-read":
        return kind, draw(addr_st), draw(reg_st), draw(st.sampled_from([4, 2, 1])), draw(st.integers(0, 3))
    if kind == "port":
        return kind, draw(st.integers(0xCF8, 0xCFF)), draw(st.sampled_from([1, 2, 4])), \
            draw(st.integers(0, 0xFFFF_FFFF)), draw(st.booleans())
    if kind == "bar":
        return kind, draw(st.integers(0, 40)), draw(st.integers(0, 0x4000)), draw(st.sampled_from([1, 2, 4, 8])), \
            draw(st.integers(0, (1 << 64) - 1)), draw(st.booleans())
    return (kind,)


def check_machine(io: Bus, mmio: Bus, host: PciHost, fixed: Fixed) -> None:
    assert io.find(0xCF8) == (0xCF8, host.address_port) and io.find(0xCFC) == (0xCFC, host.data_port)
    assert mmio.find(FIXED_MMIO[0]) == (FIXED_MMIO[0], fixed) and io.find(FIXED_IO[0]) == (FIXED_IO[0], fixed)
    decoded: list[tuple[bool, int, int]] = []
    for slot, dev in host.devices.items():
        cfg = dev.config
        for off, value in PROTECTED[slot].items():
            assert cfg.data[off] == value, f"slot {slot}: read-only byte {off:#x} changed"
        command = cfg.get(Reg.COMMAND, 2)
        mapped = dev.mapped_bars()
        for index, spec in dev.bars.items():
            reg = cfg.get(Reg.BAR0 + 4 * index, 4)
            flag_mask = 0x3 if spec.is_io else 0xF
            assert reg & flag_mask == spec.flag_bits, f"slot {slot} BAR {index}: flag bits {reg:#x}"
            base = dev.bar_address(index)
            assert base % spec.size == 0, f"slot {slot} BAR {index}: {base:#x} not aligned to {spec.size:#x}"
            enabled = bool(command & (1 if spec.is_io else 2))
            usable = base != 0 and (base + spec.size <= 0x10000 if spec.is_io else
                                    (spec.kind is BarKind.MEM64 or base + spec.size <= 1 << 32)
                                    and not any(base < r.end and r.gpa < base + spec.size for r in MEM.regions))
            if index in mapped:
                assert enabled and usable and mapped[index] == base, \
                    f"slot {slot} BAR {index} decoded at {mapped[index]:#x}: enabled={enabled} base={base:#x}"
                bus = io if spec.is_io else mmio
                hit = bus.find(base)
                assert hit is not None and hit[0] == base and hit[1] is dev._windows[index]
                hit = bus.find(base + spec.size - 1)
                assert hit is not None and hit[1] is dev._windows[index]
                decoded.append((spec.is_io, base, base + spec.size))
            elif enabled and usable:
                # only a clash with another decoded range (a fixed device, another BAR) may keep it off
                bus = io if spec.is_io else mmio
                clash = [n for s, e, n in bus.ranges() if s < base + spec.size and base < e
                         and not n.startswith(f"pci-{dev.name}-bar{index}")]
                assert clash, f"slot {slot} BAR {index} at {base:#x} is enabled and usable but not decoded"
    for i, a in enumerate(decoded):
        for b in decoded[i + 1:]:
            assert a[0] != b[0] or a[2] <= b[1] or b[2] <= a[1], f"decoded BARs overlap: {a} {b}"


def run_ops(sc) -> None:
    firmware, ops = sc
    io, mmio, host, fixed = build()
    pci = GuestPci(io, mmio)
    if firmware:
        host.assign_resources()
    for op in ops:
        kind = op[0]
        if kind in ("cfg-write", "cfg-read"):
            (slot, bus, fn), reg, size, lane = op[1], op[2], op[3], op[4]
            io.write(0xCF8, 4, (1 << 31) | (bus << 16) | (slot << 11) | (fn << 8) | (reg & 0xFC))
            port = 0xCFC + (lane if size == 1 else (lane & 2 if size == 2 else 0))
            if kind == "cfg-write":
                io.write(port, size, op[5] & ((1 << (8 * size)) - 1))
            else:
                v = io.read(port, size)
                assert 0 <= v < 1 << (8 * size)
                if host.devices.get(slot) is None or bus or fn:
                    assert v == (1 << (8 * size)) - 1, "an absent function must read all-ones"
        elif kind == "port":
            _, port, size, value, write = op
            if write:
                io.write(port, size, value & ((1 << (8 * size)) - 1))
            else:
                assert 0 <= io.read(port, size) < 1 << (8 * size)
        elif kind == "bar":
            _, which, offset, size, value, write = op
            bars = [(dev, i, spec, base) for dev in host.devices.values()
                    for i, base in dev.mapped_bars().items() for spec in [dev.bars[i]]]
            if bars:
                dev, i, spec, base = bars[which % len(bars)]
                bus, size = (io, min(size, 4)) if spec.is_io else (mmio, size)
                addr = base + offset % spec.size
                if write:
                    bus.write(addr, size, value & ((1 << (8 * size)) - 1))
                else:
                    assert 0 <= bus.read(addr, size) < 1 << (8 * size)
        else:
            host.reset()
        check_machine(io, mmio, host, fixed)
    # the machine still works: reset, firmware assigns resources, every function answers
    host.reset()
    host.assign_resources()
    check_machine(io, mmio, host, fixed)
    for slot, ident in IDS.items():
        assert pci.cfg_read(slot, 0) == ident
    virtio = host.devices[4]
    assert isinstance(virtio, VirtioPci)
    base = virtio.mapped_bars()[REGS_BAR]
    assert mmio.read(base + 0x04, 4) == virtio.device.device_feature_word(0)  # common cfg: device_feature


def test_fuzz_pci_config_and_bars(fuzz) -> None:
    fuzz.run("pci-config-bars", st.tuples(st.booleans(), st.lists(op_st(), min_size=5, max_size=60)), run_ops)


def test_bar_refused_for_a_clash_decodes_once_the_other_bar_moves() -> None:
    """Found by the target in CI: virtio-rng's BAR 4 was kept off by another device's BAR 2 and
    stayed off after that BAR was moved away (sized), although nothing was in its way any more."""
    run_ops((True, [("cfg-write", (0, 0, 0), 4, 4, 0, 0xFFFF_FFFF), ("cfg-write", (0, 0, 0), 4, 4, 0, 0xFFFF_FFFF),
                    ("cfg-write", (4, 0, 0), 32, 2, 0, 0), ("port", 3320, 1, 0, False),
                    ("cfg-write", (3, 0, 0), 24, 4, 0, 0xFFFF_FFFF)]))
