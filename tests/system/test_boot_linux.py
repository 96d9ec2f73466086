"""Linux bzImage loading: synthetic images and a real Debian cloud kernel."""

from __future__ import annotations

import struct

import pytest

from pyvmm.boot import load_kernel
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.e820 import build_e820
from support.conftest_boot import debian_kernel, make_bzimage

MiB = 1 << 20


def zp_u8(mem, off):
    return mem.read_u8(layout.ZERO_PAGE_START + off)


def zp_u16(mem, off):
    return mem.read_u16(layout.ZERO_PAGE_START + off)


def zp_u32(mem, off):
    return mem.read_u32(layout.ZERO_PAGE_START + off)


def zp_u64(mem, off):
    return mem.read_u64(layout.ZERO_PAGE_START + off)


def zp_e820(mem):
    n = zp_u8(mem, 0x1E8)
    raw = mem.read(layout.ZERO_PAGE_START + 0x2D0, 20 * n)
    return [struct.unpack_from("<QQI", raw, 20 * i) for i in range(n)]


@pytest.fixture(scope="module")
def real_kernel():
    try:
        return str(debian_kernel())
    except RuntimeError as e:
        pytest.fail(f"a Debian cloud kernel is needed for this test and could not be obtained: {e}")


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_synthetic_bzimage_64(tmp_path):
    body = bytes(range(256)) * 64
    path = write(tmp_path, "bz", make_bzimage(body))
    initrd = write(tmp_path, "initrd", b"I" * 5000)
    mem = GuestMemory(128 * MiB)
    r = load_kernel(path, mem, cmdline="console=ttyS0 root=/dev/vda", initrd=initrd)
    assert r.kind == "bzimage" and r.info["mode"] == "64"
    assert r.info["load_addr"] == 0x1000000  # pref_address, relocatable
    assert r.entry == 0x1000200 and r.cpu.regs["rip"] == 0x1000200
    assert r.cpu.mode == "long" and r.cpu.regs["rsi"] == layout.ZERO_PAGE_START
    assert mem.read(0x1000000, len(body)) == body
    # Zero page: setup header copied, loader fields filled.
    assert mem.read(layout.ZERO_PAGE_START + 0x202, 4) == b"HdrS"
    assert zp_u16(mem, 0x1FE) == 0xAA55
    assert zp_u16(mem, 0x206) == 0x020F
    assert zp_u8(mem, 0x210) == 0xFF, "type_of_loader"
    assert zp_u8(mem, 0x211) & 1, "LOADED_HIGH"
    assert zp_u32(mem, 0x214) == 0x1000000, "code32_start"
    assert zp_u8(mem, 0x1EF) == 0, "sentinel stays zero"
    cmd_ptr = zp_u32(mem, 0x228)
    assert mem.read_cstring(cmd_ptr) == b"console=ttyS0 root=/dev/vda"
    rd, rd_size = zp_u32(mem, 0x218), zp_u32(mem, 0x21C)
    assert rd_size == 5000 and rd % 4096 == 0
    assert mem.read(rd, 5000) == b"I" * 5000
    assert rd + rd_size <= 128 * MiB and rd >= 0x1000000 + 0x400000, "top of RAM, above the kernel"
    assert zp_u32(mem, 0xC0) == 0 and zp_u32(mem, 0xC4) == 0
    e = build_e820(mem)
    assert zp_e820(mem) == [(x.addr, x.size, int(x.type)) for x in e]


def test_synthetic_bzimage_32bit_entry(tmp_path):
    path = write(tmp_path, "bz", make_bzimage())
    mem = GuestMemory(64 * MiB)
    r = load_kernel(path, mem, entry="32")
    assert r.cpu.mode == "protected" and r.entry == 0x1000000 and r.cpu.regs["rsi"] == layout.ZERO_PAGE_START
    assert r.cpu.regs["rbx"] == r.cpu.regs["rdi"] == r.cpu.regs["rbp"] == 0


def test_no_64bit_entry_without_xlf(tmp_path):
    path = write(tmp_path, "bz", make_bzimage(xloadflags=0))
    mem = GuestMemory(64 * MiB)
    with pytest.raises(BootImageError, match="XLF_KERNEL_64"):
        load_kernel(path, mem, entry="64")
    r = load_kernel(path, mem)  # auto falls back to the 32-bit entry
    assert r.info["mode"] == "32"
    old = write(tmp_path, "old", make_bzimage(version=0x020A))
    assert load_kernel(old, mem).info["mode"] == "32"
    with pytest.raises(BootImageError, match="predates xloadflags"):
        load_kernel(old, mem, entry="64")


def test_small_ram_falls_back_to_1mib(tmp_path):
    path = write(tmp_path, "bz", make_bzimage(init_size=0x200000))
    mem = GuestMemory(16 * MiB)  # pref_address 16 MiB is past the end of RAM
    r = load_kernel(path, mem)
    assert r.info["load_addr"] == 0x100000 and r.entry == 0x100200


def test_non_relocatable_loads_at_1mib(tmp_path):
    path = write(tmp_path, "bz", make_bzimage(relocatable=0))
    r = load_kernel(path, GuestMemory(64 * MiB))
    assert r.info["load_addr"] == 0x100000


def test_initrd_respects_initrd_addr_max(tmp_path):
    path = write(tmp_path, "bz", make_bzimage(initrd_addr_max=0x2FFFFFF))
    initrd = write(tmp_path, "initrd", b"x" * 10000)
    mem = GuestMemory(256 * MiB)
    load_kernel(path, mem, initrd=initrd)
    rd = zp_u32(mem, 0x218)
    assert rd + 10000 <= 0x3000000 and rd % 4096 == 0
    assert rd >= 0x1000000 + 0x400000


def test_initrd_too_large(tmp_path):
    path = write(tmp_path, "bz", make_bzimage())
    initrd = tmp_path / "big"
    with open(initrd, "wb") as f:
        f.truncate(100 * MiB)
    mem = GuestMemory(64 * MiB)
    before = mem.read(0x1000000, 4096)
    with pytest.raises(BootImageError, match=r"initrd .*big.*does not fit"):
        load_kernel(path, mem, initrd=str(initrd))
    assert mem.read(0x1000000, 4096) == before, "nothing written before validation"
    assert mem.read(layout.ZERO_PAGE_START, 4096) == bytes(4096)


def test_cmdline_too_long(tmp_path):
    path = write(tmp_path, "bz", make_bzimage(cmdline_size=16))
    with pytest.raises(BootImageError, match="command line"):
        load_kernel(path, GuestMemory(64 * MiB), cmdline="x" * 17)
    load_kernel(path, GuestMemory(64 * MiB), cmdline="x" * 16)


@pytest.mark.parametrize("kwargs,match", [
    ({"version": 0x0204}, "too old"),
    ({"loadflags": 0}, "zImage"),
])
def test_unsupported_headers(tmp_path, kwargs, match):
    path = write(tmp_path, "bz", make_bzimage(**kwargs))
    with pytest.raises(BootImageError, match=match):
        load_kernel(path, GuestMemory(64 * MiB))


def test_truncated_bzimage(tmp_path):
    img = make_bzimage(b"\x90" * 8192)
    for cut, match in ((len(img) - 100, "truncated"), (5 * 512, "truncated"), (0x220, "truncated")):
        path = write(tmp_path, f"cut{cut}", img[:cut])
        with pytest.raises(BootImageError, match=match) as ei:
            load_kernel(path, GuestMemory(64 * MiB))
        assert path in str(ei.value) and "\n" not in str(ei.value)


def test_kernel_needs_more_ram(tmp_path):
    path = write(tmp_path, "bz", make_bzimage(init_size=64 * MiB))
    with pytest.raises(BootImageError, match="more memory"):
        load_kernel(path, GuestMemory(32 * MiB))


# -- the real thing -----------------------------------------------------------------------------
def test_debian_kernel(real_kernel, tmp_path):
    with open(real_kernel, "rb") as f:
        image = f.read()
    initrd = write(tmp_path, "initrd.cpio", b"070701" + bytes(3 * MiB + 77))
    mem = GuestMemory(512 * MiB)
    r = load_kernel(real_kernel, mem, cmdline="console=ttyS0 panic=-1", initrd=initrd)
    setup_sects = image[0x1F1]
    pm = image[(setup_sects + 1) * 512:]
    pref, init_size = struct.unpack_from("<QI", image, 0x258)
    assert r.kind == "bzimage" and r.info["mode"] == "64"
    assert r.info["load_addr"] == pref and r.entry == pref + 0x200
    assert r.cpu.mode == "long" and r.cpu.regs["rsi"] == layout.ZERO_PAGE_START
    assert mem.read(pref, 4096) == pm[:4096] and mem.read(pref + len(pm) - 4096, 4096) == pm[-4096:]
    # Setup header copied byte for byte, except the fields the loader owns.
    hdr_end = 0x202 + image[0x201]
    zp = mem.read(layout.ZERO_PAGE_START, 4096)
    owned = {range(0x1FA, 0x1FC), range(0x210, 0x212), range(0x214, 0x220), range(0x224, 0x22C)}
    for off in range(0x1F1, hdr_end):
        if not any(off in rg for rg in owned):
            assert zp[off] == image[off], f"setup header byte {off:#x}"
    assert zp_u8(mem, 0x210) == 0xFF
    assert mem.read_cstring(zp_u32(mem, 0x228)) == b"console=ttyS0 panic=-1"
    rd, rd_size = zp_u32(mem, 0x218), zp_u32(mem, 0x21C)
    assert rd_size == 3 * MiB + 83 and rd % 4096 == 0
    assert rd >= pref + init_size, "initrd clear of the decompression area"
    assert rd + rd_size <= min(512 * MiB, struct.unpack_from("<I", image, 0x22C)[0] + 1)
    assert mem.read(rd, 6) == b"070701"
    assert zp_e820(mem) == [(x.addr, x.size, int(x.type)) for x in build_e820(mem)]
    # 64-bit entry requirements: identity map of kernel, zero page and command line; flat __BOOT_CS.
    assert r.cpu.cs.selector == 0x10 and r.cpu.cs.l == 1 and r.cpu.ds.selector == 0x18
    pml4 = mem.read_u64(r.cpu.cr3)
    pd0 = mem.read_u64((pml4 & ~0xFFF) + 0) & ~0xFFF
    for addr in (layout.ZERO_PAGE_START, layout.CMDLINE_START, pref, pref + init_size - 1):
        pde = mem.read_u64(pd0 + (addr >> 21) * 8)
        assert pde & 0x81 == 0x81 and pde & ~0x1FFFFF & 0xFFFFFFFFF000 == addr & ~0x1FFFFF


def test_initrd_above_4g_when_allowed(tmp_path):
    """Only an initrd that cannot fit below initrd_addr_max goes high, and only if XLF allows it."""
    initrd = tmp_path / "rd"
    with open(initrd, "wb") as f:
        f.write(b"HIGH")
        f.truncate(16 * MiB)
    mem = layout.pc_memory(4096 * MiB + 512 * MiB)
    try:
        path = write(tmp_path, "bz", make_bzimage(initrd_addr_max=0x1FFFFFF, xloadflags=0x3))
        r = load_kernel(path, mem, initrd=str(initrd))
        addr = r.info["initrd_addr"]
        assert addr == (1 << 32) + 1536 * MiB - 16 * MiB, "top of high RAM (3 GiB low, 1.5 GiB high)"
        assert zp_u32(mem, 0x218) == addr & 0xFFFFFFFF and zp_u32(mem, 0xC0) == addr >> 32
        assert zp_u32(mem, 0x21C) == 16 * MiB and zp_u32(mem, 0xC4) == 0
        assert mem.read(addr, 4) == b"HIGH"
        no_high = write(tmp_path, "bz2", make_bzimage(initrd_addr_max=0x1FFFFFF, xloadflags=0x1))
        with pytest.raises(BootImageError, match="does not fit"):
            load_kernel(no_high, mem, initrd=str(initrd))
    finally:
        mem.close()
