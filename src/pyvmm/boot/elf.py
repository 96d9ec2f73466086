"""ELF kernels: uncompressed ``vmlinux`` and PVH-capable images.

An ELF kernel is loaded segment by segment at the segments' *physical*
addresses (Linux links vmlinux at high virtual addresses).  If the image has
a Xen ``XEN_ELFNOTE_PHYS32_ENTRY`` note it is started the PVH way: 32-bit
flat protected mode, paging off, EBX pointing at an ``hvm_start_info``.
Otherwise a 64-bit ELF is started as Firecracker starts vmlinux: in long
mode at its entry point with a zero page in RSI.

:func:`parse_elf` is shared with the multiboot loader.
"""

from __future__ import annotations

import ctypes
import io
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from pyvmm.boot.bootparams import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    LOADER_TYPE_UNDEFINED,
    VID_MODE_NORMAL,
    BootParams,
    LoadFlags,
    fill_e820,
)
from pyvmm.boot.common import (
    BootResult,
    check_in_ram,
    check_not_boot_tables,
    encode_cmdline,
    file_size,
    load_file_into,
)
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.boot_tables import long_mode_state, protected_mode_state
from pyvmm.x86.e820 import E820Entry, find_top_down

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
EM_386 = 3
EM_X86_64 = 62
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
LINUX_CMDLINE_SIZE = 2047  # COMMAND_LINE_SIZE - 1 on x86
SYNTHETIC_PROTOCOL = 0x020F
VMLINUX_ALIGN = 0x200000
INITRD_LIMIT_32BIT = 0x38000000  # keep a 32-bit kernel's initrd in its low memory

# Placement inside the PVH area.
PVH_MODLIST_OFFSET = 0x40
PVH_MEMMAP_OFFSET = 0x100


class HvmStartInfo(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nr_modules", ctypes.c_uint32),
        ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("rsdp_paddr", ctypes.c_uint64),
        ("memmap_paddr", ctypes.c_uint64),
        ("memmap_entries", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


assert ctypes.sizeof(HvmStartInfo) == 56


class HvmModlistEntry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("paddr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("cmdline_paddr", ctypes.c_uint64), ("reserved", ctypes.c_uint64)]


assert ctypes.sizeof(HvmModlistEntry) == 32


class HvmMemmapEntry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("type", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


assert ctypes.sizeof(HvmMemmapEntry) == 24
PVH_MEMMAP_MAX = (layout.PVH_INFO_SIZE - PVH_MEMMAP_OFFSET) // ctypes.sizeof(HvmMemmapEntry)


@dataclass
class ElfSegment:
    paddr: int
    vaddr: int
    data: bytes
    memsz: int


@dataclass
class ElfImage:
    bits: int
    machine: int
    entry: int  # as stored in e_entry (may be virtual)
    segments: list[ElfSegment]
    notes: list[tuple[bytes, int, bytes]] = field(default_factory=list)

    @property
    def low(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)

    def physical_entry(self, path: str) -> int:
        """``e_entry`` as a physical address: translated through the segment whose virtual range holds it."""
        for s in self.segments:
            if s.vaddr <= self.entry < s.vaddr + s.memsz:
                return s.paddr + (self.entry - s.vaddr)
        for s in self.segments:
            if s.paddr <= self.entry < s.paddr + s.memsz:
                return self.entry
        raise BootImageError(f"kernel {path}: ELF entry point {self.entry:#x} is outside every loadable segment")

    def note(self, name: bytes, ntype: int) -> bytes | None:
        for n, t, desc in self.notes:
            if n == name and t == ntype:
                return desc
        return None


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def _parse_notes(raw: bytes) -> list[tuple[bytes, int, bytes]]:
    """Split an ELF note area into ``(name, type, desc)``; stops quietly at a malformed note."""
    notes = []
    off = 0
    while off + 12 <= len(raw):
        namesz, descsz, ntype = struct.unpack_from("<III", raw, off)
        off += 12
        name_end = off + namesz
        desc_off = (name_end + 3) & ~3
        desc_end = desc_off + descsz
        if desc_end > len(raw):
            break
        notes.append((raw[off:name_end].rstrip(b"\0"), ntype, raw[desc_off:desc_end]))
        off = (desc_end + 3) & ~3
    return notes


def parse_elf(data: bytes, path: str) -> ElfImage:
    """Validate an x86 executable ELF and collect its loadable segments and notes (nothing is written)."""
    if len(data) < 52:
        raise BootImageError(f"kernel {path}: file is truncated (shorter than an ELF header)")
    try:
        elf = ELFFile(io.BytesIO(data))
        bits = elf.elfclass
        machine = elf["e_machine"]
        if elf.little_endian is False:
            raise BootImageError(f"kernel {path}: big-endian ELF cannot run on x86")
        if elf["e_type"] != "ET_EXEC":
            raise BootImageError(f"kernel {path}: ELF type {elf['e_type']} is not an executable (ET_EXEC)")
        segments: list[ElfSegment] = []
        notes: list[tuple[bytes, int, bytes]] = []
        for seg in elf.iter_segments():
            ptype = seg["p_type"]
            if ptype not in ("PT_LOAD", "PT_NOTE"):
                continue
            off, filesz, memsz = seg["p_offset"], seg["p_filesz"], seg["p_memsz"]
            if off + filesz > len(data):
                raise BootImageError(f"kernel {path}: file is truncated ({ptype} segment at offset "
                                     f"{off:#x}+{filesz:#x} runs past the end)")
            if ptype == "PT_NOTE":
                notes.extend(_parse_notes(data[off:off + filesz]))
                continue
            if memsz == 0:
                continue
            if filesz > memsz:
                raise BootImageError(f"kernel {path}: corrupt ELF segment (file size {filesz:#x} > "
                                     f"memory size {memsz:#x})")
            segments.append(ElfSegment(seg["p_paddr"], seg["p_vaddr"], data[off:off + filesz], memsz))
        entry = elf["e_entry"]
    except BootImageError:
        raise
    except Exception as e:  # pyelftools raises many types on hostile input; all mean "corrupt"
        raise BootImageError(f"kernel {path}: corrupt ELF file ({e})") from None
    if machine == "EM_386":
        machine_no = EM_386
    elif machine == "EM_X86_64":
        machine_no = EM_X86_64
    else:
        raise BootImageError(f"kernel {path}: ELF for {machine}, not x86")
    if not segments:
        raise BootImageError(f"kernel {path}: ELF has no loadable segments")
    return ElfImage(bits, machine_no, entry, segments, notes)


def validate_segments(image: ElfImage, e820: Sequence[E820Entry], path: str) -> None:
    """Every segment lies in RAM, clear of the boot tables, and no two overlap."""
    spans = sorted((s.paddr, s.paddr + s.memsz) for s in image.segments)
    for a, b in spans:
        check_not_boot_tables(a, b - a, path, "kernel")
        check_in_ram(e820, a, b - a, path, "kernel")
    for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False):
        if a2 < b1:
            raise BootImageError(f"kernel {path}: ELF segments overlap at {a2:#x}")


def write_segments(memory: GuestMemory, image: ElfImage) -> None:
    for s in image.segments:
        memory.write(s.paddr, s.data)
        if s.memsz > len(s.data):
            memory.fill(s.paddr + len(s.data), s.memsz - len(s.data))


def pvh_entry(image: ElfImage, path: str) -> int | None:
    """The PVH 32-bit entry from the Xen PHYS32_ENTRY note, or None if the image has none."""
    desc = image.note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)
    if desc is None:
        return None
    if len(desc) not in (4, 8):
        raise BootImageError(f"kernel {path}: malformed Xen PHYS32_ENTRY note ({len(desc)} bytes)")
    value = int.from_bytes(desc, "little")
    if value >> 32:
        raise BootImageError(f"kernel {path}: PVH entry {value:#x} is above 4 GiB")
    return value


def _place_initrd(initrd: str, e820: Sequence[E820Entry], memory: GuestMemory, limit: int,
                  avoid: list[tuple[int, int]]) -> tuple[int, int]:
    size = file_size(initrd, "initrd")
    if size == 0:
        raise BootImageError(f"initrd {initrd}: file is empty")
    addr = find_top_down(e820, size, limit=min(limit, memory.below_4g), floor=layout.HIGH_MEMORY_START,
                         avoid=avoid)
    if addr is None:
        raise BootImageError(f"initrd {initrd}: {size >> 20} MiB does not fit in guest RAM next to the "
                             f"kernel; give the guest more memory")
    return addr, size


def load_elf(path: str, data: bytes, memory: GuestMemory, *, cmdline: str, initrd: str | None,
             e820: Sequence[E820Entry], entry: str = "auto", acpi_rsdp: int | None = None) -> BootResult:
    """Load an ELF kernel: PVH if it has the note (``entry`` auto/32), else 64-bit with a zero page."""
    image = parse_elf(data, path)
    pvh = pvh_entry(image, path)
    if entry not in ("auto", "64", "32"):
        raise BootImageError(f"kernel {path}: unknown entry mode {entry!r} (use auto, 64 or 32)")
    if entry == "32" and pvh is None:
        raise BootImageError(f"kernel {path}: 32-bit entry needs a PVH (Xen PHYS32_ENTRY) ELF note")
    use_pvh = pvh is not None and entry != "64"
    if not use_pvh and image.machine != EM_X86_64:
        raise BootImageError(f"kernel {path}: 32-bit ELF without a multiboot header or PVH note "
                             f"cannot be booted")
    validate_segments(image, e820, path)
    cmd = encode_cmdline(cmdline, path, LINUX_CMDLINE_SIZE if not use_pvh else layout.CMDLINE_MAX_SIZE)
    avoid = [(image.low, image.high)]
    initrd_addr = initrd_size = 0
    if initrd:
        limit = INITRD_LIMIT_32BIT if image.machine == EM_386 else memory.below_4g
        initrd_addr, initrd_size = _place_initrd(initrd, e820, memory, limit, avoid)

    if use_pvh:
        assert pvh is not None
        if not any(s.paddr <= pvh < s.paddr + s.memsz for s in image.segments):
            raise BootImageError(f"kernel {path}: PVH entry {pvh:#x} is outside every loadable segment")
        if len(e820) > PVH_MEMMAP_MAX:
            raise BootImageError(f"kernel {path}: E820 map has {len(e820)} entries, PVH area holds "
                                 f"{PVH_MEMMAP_MAX}")
        base = layout.PVH_INFO_START
        start = HvmStartInfo(magic=HVM_START_MAGIC, version=HVM_START_VERSION,
                             cmdline_paddr=layout.CMDLINE_START, rsdp_paddr=acpi_rsdp or 0,
                             memmap_paddr=base + PVH_MEMMAP_OFFSET, memmap_entries=len(e820))
        blob = bytearray(layout.PVH_INFO_SIZE)
        if initrd:
            start.nr_modules = 1
            start.modlist_paddr = base + PVH_MODLIST_OFFSET
            mod = HvmModlistEntry(paddr=initrd_addr, size=initrd_size)
            blob[PVH_MODLIST_OFFSET:PVH_MODLIST_OFFSET + 32] = bytes(mod)
        blob[:56] = bytes(start)
        for i, e in enumerate(e820):
            off = PVH_MEMMAP_OFFSET + i * 24
            blob[off:off + 24] = bytes(HvmMemmapEntry(e.addr, e.size, int(e.type), 0))

        write_segments(memory, image)
        if initrd:
            load_file_into(memory, initrd_addr, initrd, initrd_size, "initrd")
        memory.write(layout.CMDLINE_START, cmd)
        memory.write(base, bytes(blob))
        layout.write_bios_data_area(memory)
        cpu = protected_mode_state(memory, pvh, regs={"rbx": base})
        kind, rip = "pvh", pvh
        info = {"start_info": base}
    else:
        rip = image.physical_entry(path)
        params = BootParams()
        h = params.hdr
        h.boot_flag = BOOT_FLAG_MAGIC
        h.header = HDRS_MAGIC
        h.version = SYNTHETIC_PROTOCOL
        h.type_of_loader = LOADER_TYPE_UNDEFINED
        h.loadflags = LoadFlags.LOADED_HIGH
        h.vid_mode = VID_MODE_NORMAL
        h.code32_start = image.low
        h.kernel_alignment = VMLINUX_ALIGN
        h.cmd_line_ptr = layout.CMDLINE_START
        h.cmdline_size = LINUX_CMDLINE_SIZE
        h.ramdisk_image = initrd_addr
        h.ramdisk_size = initrd_size
        if acpi_rsdp is not None:
            params.acpi_rsdp_addr = acpi_rsdp
        try:
            fill_e820(params, e820)
        except ValueError as e:
            raise BootImageError(f"kernel {path}: {e}") from None

        write_segments(memory, image)
        if initrd:
            load_file_into(memory, initrd_addr, initrd, initrd_size, "initrd")
        memory.write(layout.CMDLINE_START, cmd)
        memory.write(layout.ZERO_PAGE_START, bytes(params))
        layout.write_bios_data_area(memory)
        cpu = long_mode_state(memory, rip, rsi=layout.ZERO_PAGE_START)
        kind = "vmlinux"
        info = {"zero_page": layout.ZERO_PAGE_START}
    info.update({"low": image.low, "high": image.high, "cmdline_addr": layout.CMDLINE_START,
                 "initrd_addr": initrd_addr, "initrd_size": initrd_size, "elf_bits": image.bits})
    log.info("ELF %s: %s entry at %#x, segments %#x-%#x", path, kind, rip, image.low, image.high)
    return BootResult(cpu=cpu, kind=kind, entry=rip, info=info)
