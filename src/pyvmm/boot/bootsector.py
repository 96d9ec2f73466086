"""Raw boot sectors: a pyvmm extension for tiny real-mode guests.

A file of 512 bytes to 64 KiB ending its first sector with the 0x55 0xAA
signature (and matching no other format) is treated as what a BIOS would
load from a disk: it is copied to 0x7C00 and entered in real mode at
0000:7C00 with DL=0x80 (first hard disk).  There is no BIOS behind it, so
the guest must not rely on BIOS interrupts.
"""

from __future__ import annotations

import logging

from pyvmm.boot.common import BootResult
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.boot_tables import real_mode_state

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
SIGNATURE = b"\x55\xaa"
BOOT_DRIVE = 0x80


def is_boot_sector(data: bytes) -> bool:
    return SECTOR_SIZE <= len(data) <= layout.BOOT_SECTOR_MAX and data[510:512] == SIGNATURE


def load_boot_sector(path: str, data: bytes, memory: GuestMemory) -> BootResult:
    if not is_boot_sector(data):
        raise BootImageError(f"kernel {path}: not a boot sector (512 to {layout.BOOT_SECTOR_MAX} bytes "
                             f"with 0x55 0xAA at offset 510)")
    if not memory.contains(layout.BOOT_SECTOR_START, len(data)):
        raise BootImageError(f"kernel {path}: does not fit in guest RAM at {layout.BOOT_SECTOR_START:#x}")
    memory.write(layout.BOOT_SECTOR_START, data)
    layout.write_bios_data_area(memory)
    cpu = real_mode_state(0, layout.BOOT_SECTOR_START, regs={"rdx": BOOT_DRIVE})
    log.info("boot sector %s: %d bytes at %#x, real mode", path, len(data), layout.BOOT_SECTOR_START)
    return BootResult(cpu=cpu, kind="bootsector", entry=layout.BOOT_SECTOR_START,
                      info={"size": len(data), "load_addr": layout.BOOT_SECTOR_START})
