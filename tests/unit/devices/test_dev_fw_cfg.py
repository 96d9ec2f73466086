"""fw_cfg: the traditional port interface, the file directory and the DMA interface."""

from __future__ import annotations

import struct

import pytest

from pyvmm.devices.fw_cfg import FwCfg, FwCfgKey, encode_e820
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory


def select(fw: FwCfg, key: int) -> None:
    fw.io_write(0, 2, key)


def read(fw: FwCfg, n: int) -> bytes:
    return bytes(fw.io_read(1, 1) for _ in range(n))


def test_signature_and_id_without_dma():
    fw = FwCfg()
    assert fw.io_size == 2
    select(fw, FwCfgKey.SIGNATURE)
    assert read(fw, 4) == b"QEMU"
    assert read(fw, 2) == b"\0\0"  # past the end reads 0
    select(fw, FwCfgKey.ID)
    assert struct.unpack("<I", read(fw, 4))[0] == 1


def test_items_and_reselect_rewinds():
    fw = FwCfg()
    fw.add_u64(FwCfgKey.RAM_SIZE, 256 << 20)
    fw.add_u16(FwCfgKey.NB_CPUS, 2)
    fw.add_u16(FwCfgKey.MAX_CPUS, 4)
    fw.set_cmdline("console=ttyS0 quiet")
    select(fw, FwCfgKey.RAM_SIZE)
    assert struct.unpack("<Q", read(fw, 8))[0] == 256 << 20
    select(fw, FwCfgKey.NB_CPUS)
    assert read(fw, 1) == b"\x02"
    select(fw, FwCfgKey.NB_CPUS)
    assert read(fw, 2) == b"\x02\x00"
    select(fw, FwCfgKey.MAX_CPUS)
    assert read(fw, 2) == b"\x04\x00"
    select(fw, FwCfgKey.CMDLINE_SIZE)
    size = struct.unpack("<I", read(fw, 4))[0]
    select(fw, FwCfgKey.CMDLINE_DATA)
    assert read(fw, size) == b"console=ttyS0 quiet\0"
    select(fw, 0x1234)  # unknown key: zeros
    assert read(fw, 3) == b"\0\0\0"
    fw.io_write(1, 1, 0x55)  # data writes ignored
    select(fw, FwCfgKey.SIGNATURE)
    assert read(fw, 4) == b"QEMU"


def test_file_directory_big_endian_sorted():
    fw = FwCfg()
    e820 = encode_e820([(0, 0x9FC00, 1), (0x100000, 0x7F00000, 1)])
    assert len(e820) == 40
    k1 = fw.add_file("etc/e820", e820)
    k2 = fw.add_file("bootorder", b"/rom@genroms/linuxboot.bin\0")
    assert (k1, k2) == (0x20, 0x21)
    select(fw, FwCfgKey.FILE_DIR)
    (count,) = struct.unpack(">I", read(fw, 4))
    assert count == 2
    entries = []
    for _ in range(count):
        size, key, _res = struct.unpack(">IHH", read(fw, 8))
        name = read(fw, 56).rstrip(b"\0").decode()
        entries.append((name, size, key))
    assert entries == [("bootorder", 27, 0x21), ("etc/e820", 40, 0x20)]
    select(fw, k1)
    assert read(fw, 40) == e820
    assert fw.add_file("etc/e820", b"x") == k1  # replace keeps the key
    select(fw, FwCfgKey.FILE_DIR)
    read(fw, 4 + 64)
    assert struct.unpack(">I", read(fw, 4))[0] == 1


def test_bad_configuration_rejected():
    fw = FwCfg()
    with pytest.raises(ConfigError):
        fw.add_file("x" * 56, b"")
    with pytest.raises(ConfigError):
        fw.add_item(FwCfgKey.FILE_DIR, b"")
    with pytest.raises(ConfigError):
        fw.add_item(0x25, b"")


@pytest.fixture
def mem():
    m = GuestMemory(2 << 20)
    yield m
    m.close()


def dma_kick(fw: FwCfg, addr: int) -> None:
    """Write the descriptor address as a guest does: big-endian halves, low half last."""
    hi, lo = addr >> 32, addr & 0xFFFFFFFF
    fw.io_write(4, 4, int.from_bytes(hi.to_bytes(4, "big"), "little"))
    fw.io_write(8, 4, int.from_bytes(lo.to_bytes(4, "big"), "little"))


def test_dma_read_select_and_skip(mem):
    fw = FwCfg(memory=mem)
    assert fw.io_size == 12
    select(fw, FwCfgKey.ID)
    assert struct.unpack("<I", read(fw, 4))[0] == 3
    sig = b"".join(fw.io_read(4 + i, 1).to_bytes(1, "little") for i in range(8))
    assert sig == b"QEMU CFG"
    fw.add_file("etc/test", bytes(range(100)))
    desc = 0x1000
    # SELECT(0x20) | READ of 10 bytes to 0x2000
    mem.write(desc, struct.pack(">IIQ", (0x20 << 16) | 0x08 | 0x02, 10, 0x2000))
    dma_kick(fw, desc)
    assert mem.read_u32(desc) == 0
    assert mem.read(0x2000, 10) == bytes(range(10))
    # SKIP 80, then READ 20 (10 real bytes then zeros)
    mem.write(desc, struct.pack(">IIQ", 0x04, 80, 0))
    dma_kick(fw, desc)
    mem.fill(0x3000, 20, 0xEE)
    mem.write(desc, struct.pack(">IIQ", 0x02, 20, 0x3000))
    dma_kick(fw, desc)
    assert mem.read_u32(desc) == 0
    assert mem.read(0x3000, 20) == bytes(range(90, 100)) + bytes(10)


def test_dma_bad_addresses_set_error(mem):
    fw = FwCfg(memory=mem)
    desc = 0x1000
    # Destination outside RAM (and a huge length): error, nothing written, no huge host buffer.
    mem.write(desc, struct.pack(">IIQ", (FwCfgKey.SIGNATURE << 16) | 0x0A, 0xFFFFFFFF, 0x1F0000))
    dma_kick(fw, desc)
    assert mem.read(desc, 4) == struct.pack(">I", 1)
    mem.write(desc, struct.pack(">IIQ", 0x0A, 4, 0x1_0000_0000))
    dma_kick(fw, desc)
    assert mem.read(desc, 4) == struct.pack(">I", 1)
    # Write requests are refused.
    mem.write(desc, struct.pack(">IIQ", 0x10, 4, 0x2000))
    dma_kick(fw, desc)
    assert mem.read(desc, 4) == struct.pack(">I", 1)
    # A descriptor outside RAM is ignored without a crash.
    dma_kick(fw, 0xFFFF_FFFF_0000)


def test_dma_ports_absent_without_memory():
    fw = FwCfg()
    assert fw.io_read(4, 4) == 0xFFFFFFFF
    fw.io_write(8, 4, 0x1000)  # ignored
