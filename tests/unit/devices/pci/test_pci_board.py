"""PciBoard: the machine-side glue (virtio-pci transports, windows, firmware setup, reset)."""

from __future__ import annotations

import pytest

from pyvmm.bus import Bus
from pyvmm.config import DeviceSpec, MachineConfig
from pyvmm.devices.pci.board import PciBoard
from pyvmm.devices.virtio.options import parse_drive
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.layout import IOAPIC_ADDR
from support.pci_driver import GuestPci, RecordingLine, pc_devices


@pytest.fixture
def board(tmp_path):
    mem = GuestMemory(32 << 20)
    io, mmio = Bus("io"), Bus("mmio")
    loop = MainLoop("board-test")
    b = PciBoard(mem, mmio, io, RecordingLine, lambda: loop)
    yield b, io, mmio, tmp_path
    b.close()
    loop.close()
    mem.close()


def test_windows_avoid_ram_virtio_mmio_and_ioapic(board):
    b, io, mmio, tmp = board
    w = b.acpi()
    assert w.mem32_base >= layout.PCI_HOLE_START and w.mem32_limit < layout.VIRTIO_MMIO_BASE < IOAPIC_ADDR
    assert w.intx_gsis == (16, 17, 18, 19)  # 20-23 belong to virtio-mmio


def test_devices_from_options(board):
    """-device *-pci options, through the device registry, end up in the right slots of this board."""
    b, io, mmio, tmp = board
    disk = tmp / "d.raw"
    disk.write_bytes(bytes(1 << 16))
    cfg = MachineConfig(drives=[parse_drive(f"file={disk},format=raw,if=none,id=d0")])
    devs = pc_devices(cfg, b, io, mmio)
    for text in ("virtio-rng-pci,addr=5", "virtio-blk-pci,drive=d0", "virtio-console-pci"):
        devs.add_user_device(DeviceSpec.parse(text))
    devs.virtio.close()
    pci = GuestPci(io, mmio)
    found = pci.enumerate()
    assert found[5] == (0x1AF4, 0x1044)
    assert sorted(found.values()) == sorted([(0x8086, 0x29C0), (0x1AF4, 0x1044), (0x1AF4, 0x1042), (0x1AF4, 0x1043)])
    # firmware setup: every function decodes its BARs; machine reset clears; setup again restores
    b.firmware_setup()
    for slot in found:
        if slot:
            assert pci.cfg_read(slot, 0x04, 2) & 2 and pci.cfg_read(slot, 0x20) & ~0xF
    b.reset()
    assert all(pci.cfg_read(s, 0x20) == 0 for s in found if s)
    b.firmware_setup()
    assert all(pci.cfg_read(s, 0x20) & ~0xF for s in found if s)
