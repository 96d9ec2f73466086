"""Multiboot v1: ELF32 and a.out-kludge kernels, modules, the information block."""

from __future__ import annotations

import struct

import pytest

from pyvmm.boot import detect_format, load_kernel
from pyvmm.boot.multiboot import split_modules
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86.e820 import build_e820
from support.conftest_boot import make_elf, multiboot_header

MiB = 1 << 20


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def aout_kernel(load=0x100000, code=b"\xf4" * 32, bss=0x2000, flags=0x10003, pad=64):
    """A flat binary: some bytes, the header at ``pad``, then code; header_addr = load + pad."""
    header_addr = load + pad
    total = pad + 32 + len(code)
    addrs = (header_addr, load, load + total, load + total + bss, header_addr + 32)
    return bytes(pad) + multiboot_header(flags, addrs) + code


def info(mem, addr):
    fields = struct.unpack_from("<22I", mem.read(addr, 88))
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count", "mods_addr",
             "s0", "s1", "s2", "s3", "mmap_length", "mmap_addr", "drives_length", "drives_addr",
             "config_table", "boot_loader_name", "apm", "vbe_ci", "vbe_mi", "vbe_mode", "vbe_if"]
    return dict(zip(names, fields, strict=True))


def test_aout_kludge_with_modules(tmp_path):
    kernel = aout_kernel()
    path = write(tmp_path, "kern.bin", kernel)
    m1 = write(tmp_path, "mod1", b"1" * 5000)
    m2 = write(tmp_path, "mod2", b"2" * 100)
    mem = GuestMemory(32 * MiB)
    mem.fill(0x100000 + len(kernel), 0x2000, 0xCC)
    r = load_kernel(path, mem, cmdline="debug=1", initrd=f"{m1} root=a,,b,{m2}")
    assert r.kind == "multiboot" and r.entry == 0x100000 + 64 + 32
    cpu = r.cpu
    assert cpu.mode == "protected" and cpu.regs["rax"] == 0x2BADB002
    assert mem.read(0x100000, len(kernel)) == kernel
    assert mem.read(0x100000 + len(kernel), 0x2000) == bytes(0x2000), "bss cleared"
    mbi = info(mem, cpu.regs["rbx"])
    assert mbi["flags"] & 0b1001001101 == 0b1001001101  # mem, cmdline, mods, mmap, loader name
    assert mbi["mem_lower"] == 639 and mbi["mem_upper"] == (32 * MiB - MiB) // 1024
    assert mem.read_cstring(mbi["cmdline"]) == f"{path} debug=1".encode()
    assert mem.read_cstring(mbi["boot_loader_name"]) == b"pyvmm"
    assert mbi["mods_count"] == 2
    mods = [struct.unpack("<4I", mem.read(mbi["mods_addr"] + 16 * i, 16)) for i in range(2)]
    (s1, e1, c1, _), (s2, e2, c2, _) = mods
    assert s1 % 4096 == 0 and s2 % 4096 == 0, "flag bit 0: page-aligned modules"
    assert s1 >= 0x100000 + len(kernel) + 0x2000, "modules after the kernel's bss"
    assert e1 - s1 == 5000 and e2 - s2 == 100 and s2 >= e1
    assert mem.read(s1, 5000) == b"1" * 5000 and mem.read(s2, 100) == b"2" * 100
    assert mem.read_cstring(c1) == f"{m1} root=a,b".encode()
    assert mem.read_cstring(c2) == m2.encode()
    # mmap entries: size field 20, then base, length, type, matching E820.
    mm, n = mbi["mmap_addr"], mbi["mmap_length"] // 24
    got = [struct.unpack("<IQQI", mem.read(mm + 24 * i, 24)) for i in range(n)]
    assert got == [(20, e.addr, e.size, int(e.type)) for e in build_e820(mem)]


def test_elf32_multiboot(tmp_path):
    code = multiboot_header(0x3) + b"\x90" * 16 + b"\xf4"
    segs = [(0x200000, 0xC0200000, code, len(code)), (0x201000, 0xC0201000, b"d" * 8, 0x3000)]
    path = write(tmp_path, "k.elf", make_elf(32, 0xC020000C, segs))
    mem = GuestMemory(16 * MiB)
    r = load_kernel(path, mem)
    assert r.kind == "multiboot" and r.info["format"] == "ELF"
    assert r.entry == 0x20000C, "virtual entry translated to physical"
    assert mem.read(0x200000, len(code)) == code
    assert mem.read(0x201008, 0x2FF8) == bytes(0x2FF8)
    mbi = info(mem, r.cpu.regs["rbx"])
    assert mbi["mods_count"] == 0 and not mbi["flags"] & (1 << 3)
    assert mem.read_cstring(mbi["cmdline"]) == path.encode()


def test_multiboot_beats_other_formats(tmp_path):
    assert detect_format(aout_kernel()) == "multiboot"
    hidden = bytes(8192) + aout_kernel()  # header past the first 8 KiB is not a multiboot header
    assert detect_format(hidden) == "unknown"
    bad_sum = bytes(64) + multiboot_header(0x10003, (0, 0, 0, 0, 0), checksum=1)
    assert detect_format(bad_sum) == "unknown"
    misaligned = bytes(2) + aout_kernel()
    assert detect_format(misaligned) == "unknown"


def test_unsupported_required_flag(tmp_path):
    path = write(tmp_path, "k", aout_kernel(flags=0x10000 | (1 << 5)))
    with pytest.raises(BootImageError, match="unsupported features"):
        load_kernel(path, GuestMemory(16 * MiB))


def test_video_flag_is_tolerated(tmp_path):
    path = write(tmp_path, "k", aout_kernel(flags=0x10007))
    r = load_kernel(path, GuestMemory(16 * MiB))
    assert r.kind == "multiboot"


def test_non_elf_without_kludge(tmp_path):
    path = write(tmp_path, "k", bytes(64) + multiboot_header(0x3) + b"\xf4")
    with pytest.raises(BootImageError, match="neither ELF"):
        load_kernel(path, GuestMemory(16 * MiB))


def test_elf64_multiboot_rejected(tmp_path):
    code = multiboot_header(0x3) + b"\xf4"
    path = write(tmp_path, "k", make_elf(64, 0x200000, [(0x200000, 0x200000, code, len(code))]))
    with pytest.raises(BootImageError, match="64-bit ELF multiboot"):
        load_kernel(path, GuestMemory(16 * MiB))


@pytest.mark.parametrize("addrs,match", [
    ((0x100040, 0x100000, 0x200000, 0, 0x100060), "truncated"),  # load_end past the file
    ((0x100040, 0x100080, 0, 0, 0x100060), "above header_addr"),
    ((0x100040, 0x100000, 0, 0, 0x300000), "entry"),
    ((0x100040, 0x100000, 0, 0x100001, 0x100060), "bss_end_addr"),
    ((0x100040, 0x100000 - 0x1000, 0, 0, 0x100060), "before the start of the file"),
    ((0x1040, 0x1000, 0, 0, 0x1060), "boot tables"),
    ((0x7FF00040, 0x7FF00000, 0, 0, 0x7FF00060), "not in guest RAM"),
])
def test_bad_aout_fields(tmp_path, addrs, match):
    path = write(tmp_path, "k", bytes(64) + multiboot_header(0x10003, addrs) + b"\xf4" * 32)
    mem = GuestMemory(16 * MiB)
    with pytest.raises(BootImageError, match=match):
        load_kernel(path, mem)
    assert mem.read(0x100000, 256) == bytes(256)


def test_missing_module(tmp_path):
    path = write(tmp_path, "k", aout_kernel())
    with pytest.raises(BootImageError, match=r"multiboot module .*nope: no such file"):
        load_kernel(path, GuestMemory(16 * MiB), initrd=str(tmp_path / "nope") + " arg")


def test_split_modules():
    assert split_modules("a x,b") == ["a x", "b"]
    assert split_modules("a,,b , c,") == ["a,b", "c"]
    assert split_modules("") == []
