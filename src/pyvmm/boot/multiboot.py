"""Multiboot (version 1) kernels.

The header must sit 4-byte aligned in the first 8 KiB.  ELF32 kernels are
loaded by their program headers; others must set flag bit 16 and give load
addresses in the header (the "a.out kludge", also used by flat binaries).
Flag bits 0-15 are requirements: bit 0 (page-aligned modules) and bit 1
(memory map) are honoured, bit 2 (video mode) is accepted but no video
information is provided (as QEMU does without a framebuffer), any other
bit in 0-15 makes the image unbootable.  The kernel is entered in 32-bit
protected mode, paging off, with EAX=0x2BADB002 and EBX=info block.

Modules come from the ``initrd`` string as in QEMU: a comma-separated list
of ``file [args]`` items (``,,`` for a literal comma); each module's command
line is the whole item.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.boot.common import (
    BootResult,
    check_in_ram,
    check_not_boot_tables,
    file_size,
    load_file_into,
)
from pyvmm.boot.elf import is_elf, parse_elf, validate_segments, write_segments
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.boot_tables import protected_mode_state
from pyvmm.x86.e820 import E820Entry, E820Type

log = logging.getLogger(__name__)

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192
LOADER_NAME = b"pyvmm\0"

FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_AOUT_KLUDGE = 1 << 16
SUPPORTED_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

# multiboot_info.flags bits
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MEM_MAP = 1 << 6
INFO_LOADER_NAME = 1 << 9


class MultibootInfo(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("mem_lower", ctypes.c_uint32),
        ("mem_upper", ctypes.c_uint32),
        ("boot_device", ctypes.c_uint32),
        ("cmdline", ctypes.c_uint32),
        ("mods_count", ctypes.c_uint32),
        ("mods_addr", ctypes.c_uint32),
        ("syms", ctypes.c_uint32 * 4),
        ("mmap_length", ctypes.c_uint32),
        ("mmap_addr", ctypes.c_uint32),
        ("drives_length", ctypes.c_uint32),
        ("drives_addr", ctypes.c_uint32),
        ("config_table", ctypes.c_uint32),
        ("boot_loader_name", ctypes.c_uint32),
        ("apm_table", ctypes.c_uint32),
        ("vbe_control_info", ctypes.c_uint32),
        ("vbe_mode_info", ctypes.c_uint32),
        ("vbe_mode", ctypes.c_uint16),
        ("vbe_interface_seg", ctypes.c_uint16),
        ("vbe_interface_off", ctypes.c_uint16),
        ("vbe_interface_len", ctypes.c_uint16),
    ]


assert ctypes.sizeof(MultibootInfo) == 88


class MultibootModule(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("mod_start", ctypes.c_uint32), ("mod_end", ctypes.c_uint32),
                ("string", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


assert ctypes.sizeof(MultibootModule) == 16


class MultibootMmapEntry(ctypes.LittleEndianStructure):
    """One mmap entry; ``size`` counts the bytes after itself (20)."""

    _pack_ = 1
    _fields_ = [("size", ctypes.c_uint32), ("addr", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("type", ctypes.c_uint32)]


assert ctypes.sizeof(MultibootMmapEntry) == 24


@dataclass
class MultibootHeader:
    offset: int  # in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(data: bytes) -> MultibootHeader | None:
    """The first valid multiboot header (magic + checksum) in the first 8 KiB, or None."""
    limit = min(len(data), SEARCH_LIMIT) - 12
    magic = struct.pack("<I", HEADER_MAGIC)
    off = data.find(magic, 0, limit + 4)
    while 0 <= off <= limit:
        if off % 4 == 0:
            _, flags, checksum = struct.unpack_from("<III", data, off)
            if (HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
                hdr = MultibootHeader(off, flags)
                if flags & FLAG_AOUT_KLUDGE and off + 32 <= len(data):  # else reported by the loader
                    (hdr.header_addr, hdr.load_addr, hdr.load_end_addr, hdr.bss_end_addr,
                     hdr.entry_addr) = struct.unpack_from("<5I", data, off + 12)
                return hdr
        off = data.find(magic, off + 1, limit + 4)
    return None


def split_modules(spec: str) -> list[str]:
    """QEMU's ``-initrd`` module list: items split on ``,``; ``,,`` is a literal comma."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(spec):
        c = spec[i]
        if c == ",":
            if spec[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return [s.strip() for s in items if s.strip()]


@dataclass
class _Module:
    path: str
    cmdline: bytes
    size: int
    addr: int = 0


def _aout_plan(path: str, data: bytes, hdr: MultibootHeader) -> tuple[int, bytes, int, int]:
    """(load address, bytes to load, bss end, entry) from a header with the a.out kludge."""
    if hdr.offset + 32 > len(data):
        raise BootImageError(f"kernel {path}: file is truncated inside the multiboot header")
    if hdr.load_addr > hdr.header_addr:
        raise BootImageError(f"kernel {path}: multiboot load_addr {hdr.load_addr:#x} is above "
                             f"header_addr {hdr.header_addr:#x}")
    file_start = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if file_start < 0:
        raise BootImageError(f"kernel {path}: multiboot header_addr/load_addr put the image before "
                             f"the start of the file")
    if hdr.load_end_addr:
        if hdr.load_end_addr < hdr.load_addr:
            raise BootImageError(f"kernel {path}: multiboot load_end_addr is below load_addr")
        size = hdr.load_end_addr - hdr.load_addr
        if file_start + size > len(data):
            raise BootImageError(f"kernel {path}: file is truncated ({len(data) - file_start} bytes to "
                                 f"load, header asks for {size})")
    else:
        size = len(data) - file_start
    load_end = hdr.load_addr + size
    bss_end = hdr.bss_end_addr or load_end
    if bss_end < load_end:
        raise BootImageError(f"kernel {path}: multiboot bss_end_addr is below the end of the loaded image")
    if not hdr.load_addr <= hdr.entry_addr < bss_end:
        raise BootImageError(f"kernel {path}: multiboot entry {hdr.entry_addr:#x} is outside the image")
    return hdr.load_addr, data[file_start:file_start + size], bss_end, hdr.entry_addr


def load_multiboot(path: str, data: bytes, hdr: MultibootHeader, memory: GuestMemory, *, cmdline: str,
                   initrd: str | None, e820: Sequence[E820Entry]) -> BootResult:
    """Load a multiboot kernel and its modules and build the multiboot information block."""
    unknown = hdr.flags & 0xFFFF & ~SUPPORTED_REQUIRED
    if unknown:
        raise BootImageError(f"kernel {path}: multiboot header requires unsupported features "
                             f"(flags {unknown:#x})")
    if hdr.flags & FLAG_VIDEO_MODE:
        log.warning("multiboot kernel %s asks for a video mode; continuing without video information", path)

    # -- kernel image -----------------------------------------------------------------------
    image = None
    if hdr.flags & FLAG_AOUT_KLUDGE:
        load_addr, blob, kernel_end, entry = _aout_plan(path, data, hdr)
        check_not_boot_tables(load_addr, kernel_end - load_addr, path, "kernel")
        check_in_ram(e820, load_addr, kernel_end - load_addr, path, "kernel")
        kind_detail = "a.out kludge"
    elif is_elf(data):
        image = parse_elf(data, path)
        if image.bits != 32:
            raise BootImageError(f"kernel {path}: 64-bit ELF multiboot kernels are not supported "
                                 f"(multiboot v1 loads ELF32 only)")
        validate_segments(image, e820, path)
        entry = image.physical_entry(path)
        load_addr, kernel_end = image.low, image.high
        blob = b""
        kind_detail = "ELF"
    else:
        raise BootImageError(f"kernel {path}: multiboot image is neither ELF nor has the address "
                             f"fields (flag bit 16)")

    # -- modules: page aligned, after the kernel --------------------------------------------
    modules: list[_Module] = []
    next_addr = layout.align_up(max(kernel_end, layout.HIGH_MEMORY_START), layout.PAGE_SIZE)
    for item in split_modules(initrd or ""):
        mpath = item.split(None, 1)[0]
        size = file_size(mpath, "multiboot module")
        mod = _Module(mpath, item.encode("utf-8", "surrogateescape") + b"\0", size, next_addr)
        if mod.addr + size > memory.below_4g:
            raise BootImageError(f"multiboot module {mpath}: {size} bytes do not fit in guest RAM after "
                                 f"{mod.addr:#x}; give the guest more memory")
        check_in_ram(e820, mod.addr, size, mpath, "multiboot module")
        modules.append(mod)
        next_addr = layout.align_up(mod.addr + size, layout.PAGE_SIZE)

    # -- information block ------------------------------------------------------------------
    base = layout.MULTIBOOT_INFO_START
    info = MultibootInfo()
    area = bytearray()
    info_size = ctypes.sizeof(MultibootInfo)

    def add(blob_: bytes, align: int = 4) -> int:
        """Append to the area after the info struct; returns the guest address."""
        pad = (-(info_size + len(area))) % align
        area.extend(bytes(pad))
        addr = base + info_size + len(area)
        area.extend(blob_)
        return addr

    usable = sorted((e.addr, e.end) for e in e820 if e.type == E820Type.RAM)
    lower = next((b for a, b in usable if a == 0), 0)
    upper = next((b for a, b in usable if a <= layout.HIGH_MEMORY_START < b), layout.HIGH_MEMORY_START)
    info.mem_lower = min(lower, 640 * 1024) // 1024
    info.mem_upper = (upper - layout.HIGH_MEMORY_START) // 1024
    info.flags = INFO_MEMORY | INFO_CMDLINE | INFO_MEM_MAP | INFO_LOADER_NAME
    full_cmdline = f"{path} {cmdline}".strip() if cmdline else path
    info.cmdline = add(full_cmdline.encode("utf-8", "surrogateescape") + b"\0", 1)
    info.boot_loader_name = add(LOADER_NAME, 1)
    mmap = b"".join(bytes(MultibootMmapEntry(20, e.addr, e.size, int(e.type))) for e in e820)
    info.mmap_addr = add(mmap, 8)
    info.mmap_length = len(mmap)
    if modules:
        info.flags |= INFO_MODS
        strings = [add(m.cmdline, 1) for m in modules]
        table = b"".join(bytes(MultibootModule(m.addr, m.addr + m.size, s, 0)) for m, s in zip(modules, strings,
                                                                                             strict=True))
        info.mods_addr = add(table, 16)
        info.mods_count = len(modules)
    if info_size + len(area) > layout.MULTIBOOT_INFO_SIZE:
        raise BootImageError(f"kernel {path}: multiboot information ({info_size + len(area)} bytes: command "
                             f"lines, memory map, modules) exceeds {layout.MULTIBOOT_INFO_SIZE} bytes")

    # -- write ------------------------------------------------------------------------------
    if image is not None:
        write_segments(memory, image)
    else:
        memory.write(load_addr, blob)
        if kernel_end > load_addr + len(blob):
            memory.fill(load_addr + len(blob), kernel_end - load_addr - len(blob))
    for m in modules:
        load_file_into(memory, m.addr, m.path, m.size, "multiboot module")
    memory.write(base, bytes(info) + bytes(area))
    layout.write_bios_data_area(memory)
    cpu = protected_mode_state(memory, entry, regs={"rax": BOOTLOADER_MAGIC, "rbx": base})
    details = {
        "format": kind_detail, "load_addr": load_addr, "kernel_end": kernel_end, "info_addr": base,
        "modules": [(os.path.basename(m.path), m.addr, m.size) for m in modules],
        "mem_lower": info.mem_lower, "mem_upper": info.mem_upper,
    }
    log.info("multiboot %s (%s): entry %#x, image %#x-%#x, %d module(s)", path, kind_detail, entry,
             load_addr, kernel_end, len(modules))
    return BootResult(cpu=cpu, kind="multiboot", entry=entry, info=details)
