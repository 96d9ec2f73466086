"""The Linux x86 zero page (``struct boot_params``) and its embedded setup header.

Offsets follow Documentation/arch/x86/boot.rst and zero-page.rst.  Only the
fields a direct-boot loader fills are named; the rest are padding that
stays zero.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Sequence

from pyvmm.x86.e820 import E820Entry

SETUP_HEADER_OFFSET = 0x1F1
HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_FLAG_MAGIC = 0xAA55
E820_MAX_ZEROPAGE = 128
LOADER_TYPE_UNDEFINED = 0xFF
VID_MODE_NORMAL = 0xFFFF


class LoadFlags(enum.IntFlag):
    LOADED_HIGH = 1 << 0
    KASLR_FLAG = 1 << 1
    QUIET_FLAG = 1 << 5
    KEEP_SEGMENTS = 1 << 6
    CAN_USE_HEAP = 1 << 7


class XLoadFlags(enum.IntFlag):
    KERNEL_64 = 1 << 0
    CAN_BE_LOADED_ABOVE_4G = 1 << 1
    EFI_HANDOVER_32 = 1 << 2
    EFI_HANDOVER_64 = 1 << 3
    EFI_KEXEC = 1 << 4
    FIVE_LEVEL = 1 << 5
    FIVE_LEVEL_ENABLED = 1 << 6


class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header`` at offset 0x1f1 of both the bzImage and the zero page."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),  # 0x1f1
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),  # 0x1fe
        ("jump", ctypes.c_uint16),  # 0x200
        ("header", ctypes.c_uint32),  # 0x202
        ("version", ctypes.c_uint16),  # 0x206
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),
        ("type_of_loader", ctypes.c_uint8),  # 0x210
        ("loadflags", ctypes.c_uint8),
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),  # 0x214
        ("ramdisk_image", ctypes.c_uint32),  # 0x218
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),  # 0x224
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),  # 0x228
        ("initrd_addr_max", ctypes.c_uint32),  # 0x22c
        ("kernel_alignment", ctypes.c_uint32),  # 0x230
        ("relocatable_kernel", ctypes.c_uint8),
        ("min_alignment", ctypes.c_uint8),
        ("xloadflags", ctypes.c_uint16),  # 0x236
        ("cmdline_size", ctypes.c_uint32),  # 0x238
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),  # 0x248
        ("payload_length", ctypes.c_uint32),
        ("setup_data", ctypes.c_uint64),  # 0x250
        ("pref_address", ctypes.c_uint64),  # 0x258
        ("init_size", ctypes.c_uint32),  # 0x260
        ("handover_offset", ctypes.c_uint32),
        ("kernel_info_offset", ctypes.c_uint32),  # 0x268
    ]


assert ctypes.sizeof(SetupHeader) == 0x26C - SETUP_HEADER_OFFSET


class BootE820Entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32)]


assert ctypes.sizeof(BootE820Entry) == 20


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params``: one 4 KiB page whose address the kernel gets in RSI/ESI."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),  # 0x040
        ("_pad2", ctypes.c_uint8 * 4),
        ("tboot_addr", ctypes.c_uint64),  # 0x058
        ("ist_info", ctypes.c_uint8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad3", ctypes.c_uint8 * 8),
        ("hd0_info", ctypes.c_uint8 * 16),  # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),
        ("sys_desc_table", ctypes.c_uint8 * 0x10),  # 0x0a0
        ("olpc_ofw_header", ctypes.c_uint8 * 0x10),  # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),
        ("cc_blob_address", ctypes.c_uint32),  # 0x13c
        ("edid_info", ctypes.c_uint8 * 0x80),  # 0x140
        ("efi_info", ctypes.c_uint8 * 0x20),  # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),  # 0x1e0
        ("scratch", ctypes.c_uint32),
        ("e820_entries", ctypes.c_uint8),  # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),
        ("kbd_status", ctypes.c_uint8),
        ("secure_boot", ctypes.c_uint8),
        ("_pad5", ctypes.c_uint8 * 2),
        ("sentinel", ctypes.c_uint8),  # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),
        ("hdr", SetupHeader),  # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x26C)),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),  # 0x290
        ("e820_table", BootE820Entry * E820_MAX_ZEROPAGE),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),
        ("eddbuf", ctypes.c_uint8 * (6 * 82)),  # 0xd00
        ("_pad9", ctypes.c_uint8 * 276),
    ]


assert ctypes.sizeof(BootParams) == 4096
assert BootParams.hdr.offset == SETUP_HEADER_OFFSET
assert BootParams.e820_table.offset == 0x2D0
assert BootParams.ext_ramdisk_image.offset == 0xC0


def fill_e820(params: BootParams, e820: Sequence[E820Entry]) -> None:
    """Copy an E820 map into the zero page (the kernel reads at most 128 entries from there)."""
    if len(e820) > E820_MAX_ZEROPAGE:
        raise ValueError(f"E820 map has {len(e820)} entries; the zero page holds {E820_MAX_ZEROPAGE}")
    for i, e in enumerate(e820):
        params.e820_table[i] = BootE820Entry(e.addr, e.size, int(e.type))
    params.e820_entries = len(e820)
