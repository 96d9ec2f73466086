"""ELF kernels: vmlinux-style 64-bit entry with a zero page, and PVH."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from pyvmm.boot import load_kernel
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.e820 import build_e820
from support.conftest_boot import elf_note, make_elf

MiB = 1 << 20
KVIRT = 0xFFFFFFFF80000000  # __START_KERNEL_map


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def vmlinux_like(pvh: int | None = None, note_size: int = 8) -> bytes:
    """Two segments linked high with physical load addresses, like Linux's vmlinux."""
    text = b"\xf4" * 0x3000
    data = b"D" * 0x100
    notes = elf_note(b"GNU", 3, b"build-id") + elf_note(b"Linux", 6, b"6.1\0")
    if pvh is not None:
        notes += elf_note(b"Xen", 18, pvh.to_bytes(note_size, "little"))
    segs = [(0x1000000, KVIRT + 0x1000000, text, len(text)),
            (0x1200000, KVIRT + 0x1200000, data, 0x5000)]  # bss of 0x4f00
    return make_elf(64, KVIRT + 0x1000000 + 0x40, segs, notes=notes)


def test_vmlinux_64bit_entry_with_zero_page(tmp_path):
    path = write(tmp_path, "vmlinux", vmlinux_like())
    initrd = write(tmp_path, "rd", b"R" * 3000)
    mem = GuestMemory(64 * MiB)
    mem.fill(0x1200000, 0x5000, 0xAA)  # the loader must clear bss
    r = load_kernel(path, mem, cmdline="console=ttyS0", initrd=initrd)
    assert r.kind == "vmlinux"
    assert r.entry == 0x1000040, "virtual e_entry translated to physical"
    assert r.cpu.mode == "long" and r.cpu.regs["rsi"] == layout.ZERO_PAGE_START
    assert mem.read(0x1000000, 0x3000) == b"\xf4" * 0x3000
    assert mem.read(0x1200000, 0x100) == b"D" * 0x100
    assert mem.read(0x1200100, 0x4F00) == bytes(0x4F00)
    zp = layout.ZERO_PAGE_START
    assert mem.read(zp + 0x202, 4) == b"HdrS" and mem.read_u16(zp + 0x1FE) == 0xAA55
    assert mem.read_u8(zp + 0x210) == 0xFF
    assert mem.read_cstring(mem.read_u32(zp + 0x228)) == b"console=ttyS0"
    rd, size = mem.read_u32(zp + 0x218), mem.read_u32(zp + 0x21C)
    assert size == 3000 and rd % 4096 == 0 and mem.read(rd, 3000) == b"R" * 3000
    assert not (rd < 0x1205000 and rd + size > 0x1000000), "initrd clear of the kernel"
    n = mem.read_u8(zp + 0x1E8)
    assert n == len(build_e820(mem)) == 3


@pytest.mark.parametrize("note_size", [4, 8])
def test_pvh_entry(tmp_path, note_size):
    path = write(tmp_path, "vmlinux", vmlinux_like(pvh=0x1000100, note_size=note_size))
    initrd = write(tmp_path, "rd", b"M" * 8192)
    mem = GuestMemory(64 * MiB)
    r = load_kernel(path, mem, cmdline="earlyprintk=ttyS0", initrd=initrd, acpi_rsdp=0xE0000)
    assert r.kind == "pvh" and r.entry == 0x1000100
    assert r.cpu.mode == "protected" and r.cpu.regs["rbx"] == layout.PVH_INFO_START
    assert r.cpu.cs.db == 1 and r.cpu.cs.limit == 0xFFFFFFFF
    si = mem.read(layout.PVH_INFO_START, 56)
    magic, version, flags, nmods, modlist, cmdline, rsdp, memmap, nmem = struct.unpack_from("<IIIIQQQQI", si)
    assert magic == 0x336EC578 and version == 1 and nmods == 1 and rsdp == 0xE0000
    assert mem.read_cstring(cmdline) == b"earlyprintk=ttyS0"
    paddr, size, mcmd, _ = struct.unpack("<QQQQ", mem.read(modlist, 32))
    assert size == 8192 and paddr % 4096 == 0 and mem.read(paddr, 8192) == b"M" * 8192
    entries = [struct.unpack("<QQII", mem.read(memmap + 24 * i, 24))[:3] for i in range(nmem)]
    assert entries == [(e.addr, e.size, int(e.type)) for e in build_e820(mem)]


def test_pvh_forced_64(tmp_path):
    path = write(tmp_path, "vmlinux", vmlinux_like(pvh=0x1000100))
    r = load_kernel(path, GuestMemory(64 * MiB), entry="64")
    assert r.kind == "vmlinux" and r.cpu.mode == "long"


def test_32bit_entry_needs_pvh(tmp_path):
    path = write(tmp_path, "vmlinux", vmlinux_like())
    with pytest.raises(BootImageError, match="PVH"):
        load_kernel(path, GuestMemory(64 * MiB), entry="32")


def test_elf32_without_pvh_rejected(tmp_path):
    path = write(tmp_path, "k32", make_elf(32, 0x100000, [(0x100000, 0x100000, b"\xf4" * 16, 16)]))
    with pytest.raises(BootImageError, match="32-bit ELF"):
        load_kernel(path, GuestMemory(16 * MiB))


def test_elf32_pvh(tmp_path):
    notes = elf_note(b"Xen", 18, struct.pack("<I", 0x100004))
    path = write(tmp_path, "k32", make_elf(32, 0x100000, [(0x100000, 0x100000, b"\xf4" * 16, 16)], notes=notes))
    r = load_kernel(path, GuestMemory(16 * MiB))
    assert r.kind == "pvh" and r.entry == 0x100004


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d[:40], "truncated"),
    (lambda d: d[:0x1000], "truncated"),  # program headers fine, segment data cut off
    (lambda d: d[:4] + b"\x07" + d[5:], "corrupt ELF"),  # bad EI_CLASS
    (lambda d: d[:16] + struct.pack("<H", 3) + d[18:], "not an executable"),  # ET_DYN
    (lambda d: d[:18] + struct.pack("<H", 40) + d[20:], "not x86"),  # EM_ARM
])
def test_corrupt_elf(tmp_path, mutate, match):
    path = write(tmp_path, "bad", mutate(vmlinux_like()))
    mem = GuestMemory(64 * MiB)
    with pytest.raises(BootImageError, match=match) as ei:
        load_kernel(path, mem)
    assert str(ei.value).startswith(f"kernel {path}:")
    assert mem.read(0x1000000, 64) == bytes(64)


def test_segment_outside_ram(tmp_path):
    path = write(tmp_path, "big", make_elf(64, 0x1000000, [(0x1000000, 0x1000000, b"\xf4", 0x8000000)]))
    with pytest.raises(BootImageError, match="not in guest RAM"):
        load_kernel(path, GuestMemory(64 * MiB))


def test_entry_outside_segments(tmp_path):
    path = write(tmp_path, "e", make_elf(64, 0x5000000, [(0x1000000, 0x1000000, b"\xf4", 16)]))
    with pytest.raises(BootImageError, match="entry point"):
        load_kernel(path, GuestMemory(64 * MiB))


def test_gcc_built_pvh_elf(tmp_path):
    """A real toolchain's ELF: high virtual link address, AT() physical addresses, Xen note, bss."""
    for tool in ("gcc", "ld"):
        assert shutil.which(tool), f"{tool} is needed to build the test kernel"
    (tmp_path / "k.S").write_text("""
        .section .note.Xen, "a", @note
        .balign 4
        .long 4f - 3f
        .long 6f - 5f
        .long 18
3:      .asciz "Xen"
4:      .balign 4
5:      .quad pvh_start - 0xffffffff80000000
6:      .balign 4
        .text
        .code32
        .globl pvh_start
pvh_start:
        movl $0x12345678, %eax
        hlt
        .code64
        .globl _start
_start:
        hlt
""")
    (tmp_path / "k.ld").write_text("""
ENTRY(_start)
SECTIONS {
  . = 0xffffffff80200000;
  .text : AT(0x200000) { *(.text) }
  .notes : AT(0x201000) { *(.note.Xen) }
  .bss : AT(0x202000) { *(.bss) . += 0x3000; }
}
""")
    subprocess.run(["gcc", "-c", "k.S", "-o", "k.o"], cwd=tmp_path, check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-static", "-nostdlib", "-T", "k.ld", "-z", "max-page-size=0x1000",
                    "-o", "k.elf", "k.o"], cwd=tmp_path, check=True)
    mem = GuestMemory(16 * MiB)
    r = load_kernel(str(tmp_path / "k.elf"), mem)
    assert r.kind == "pvh" and r.entry == 0x200000
    assert mem.read(0x200000, 6) == b"\xb8\x78\x56\x34\x12\xf4"
    r = load_kernel(str(tmp_path / "k.elf"), mem, entry="64")
    assert r.kind == "vmlinux" and r.entry == 0x200006
