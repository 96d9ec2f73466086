"""Linux bzImage loading by the x86 boot protocol (Documentation/arch/x86/boot.rst).

pyvmm skips the real-mode setup code, as QEMU's direct-boot option ROM,
Firecracker and cloud-hypervisor do: it loads only the protected-mode
kernel, builds the zero page itself, and enters either the 64-bit entry
point (``load address + 0x200``, long mode, identity-mapped) or the 32-bit
one (the load address, flat protected mode, paging off) with the zero page
address in RSI/ESI.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

from pyvmm.boot.bootparams import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    LOADER_TYPE_UNDEFINED,
    SETUP_HEADER_OFFSET,
    VID_MODE_NORMAL,
    BootParams,
    LoadFlags,
    SetupHeader,
    XLoadFlags,
    fill_e820,
)
from pyvmm.boot.common import (
    BootResult,
    check_in_ram,
    encode_cmdline,
    file_size,
    load_file_into,
)
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.boot_tables import long_mode_state, protected_mode_state
from pyvmm.x86.e820 import E820Entry, find_top_down, in_ram

log = logging.getLogger(__name__)

MIN_PROTOCOL = 0x0206  # cmdline_size, initrd_addr_max, relocatable kernels
PROTOCOL_XLOADFLAGS = 0x020C
PROTOCOL_PREF_ADDRESS = 0x020A  # pref_address, init_size
PROTOCOL_PAYLOAD = 0x0208
PROTOCOL_RSDP = 0x020E
ENTRY_64_OFFSET = 0x200
HEADER_END_MAX = SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader)


def is_bzimage(data: bytes) -> bool:
    """Whether ``data`` carries a boot-protocol setup header ("HdrS" at 0x202)."""
    return len(data) >= 0x206 and data[0x202:0x206] == b"HdrS"


def parse_setup_header(data: bytes, path: str) -> tuple[SetupHeader, int]:
    """The image's setup header (fields past its declared end zeroed) and the header's end offset."""
    if len(data) < 0x206:
        raise BootImageError(f"kernel {path}: file is truncated ({len(data)} bytes, no setup header)")
    hdr_end = 0x202 + data[0x201]  # the jump at 0x200 skips exactly the header
    if hdr_end > len(data):
        raise BootImageError(f"kernel {path}: file is truncated inside the setup header")
    raw = bytearray(ctypes.sizeof(SetupHeader))
    n = min(hdr_end, HEADER_END_MAX) - SETUP_HEADER_OFFSET
    raw[:n] = data[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + n]
    hdr = SetupHeader.from_buffer_copy(raw)
    if hdr.header != HDRS_MAGIC:
        raise BootImageError(f"kernel {path}: no 'HdrS' setup header")
    return hdr, min(hdr_end, HEADER_END_MAX)


def _version(v: int) -> str:
    return f"{v >> 8}.{v & 0xFF:02d}"


def load_bzimage(path: str, data: bytes, memory: GuestMemory, *, cmdline: str, initrd: str | None,
                 e820: Sequence[E820Entry], entry: str = "auto",
                 acpi_rsdp: int | None = None) -> BootResult:
    """Load a bzImage (already read into ``data``) and describe its entry.

    ``entry`` is ``"64"``, ``"32"`` or ``"auto"`` (64-bit when the kernel
    advertises XLF_KERNEL_64, else 32-bit).
    """
    hdr, hdr_end = parse_setup_header(data, path)
    ver = hdr.version
    if hdr.boot_flag != BOOT_FLAG_MAGIC:
        raise BootImageError(f"kernel {path}: setup header lacks the 0xAA55 boot flag")
    if ver < MIN_PROTOCOL:
        raise BootImageError(f"kernel {path}: boot protocol {_version(ver)} is too old "
                             f"({_version(MIN_PROTOCOL)} or newer is supported)")
    if not hdr.loadflags & LoadFlags.LOADED_HIGH:
        raise BootImageError(f"kernel {path}: zImage (loaded low) kernels are not supported, use a bzImage")

    setup_sects = hdr.setup_sects or 4
    setup_size = (setup_sects + 1) * 512
    if len(data) <= setup_size:
        raise BootImageError(f"kernel {path}: file is truncated (no protected-mode kernel after "
                             f"{setup_size} bytes of setup)")
    kernel = memoryview(data)[setup_size:]
    if hdr.syssize and len(kernel) + 15 < hdr.syssize * 16:  # syssize counts whole 16-byte paragraphs
        raise BootImageError(f"kernel {path}: file is truncated ({len(kernel)} bytes of kernel, "
                             f"header says {hdr.syssize * 16})")
    if ver >= PROTOCOL_PAYLOAD and hdr.payload_offset + hdr.payload_length > len(kernel):
        raise BootImageError(f"kernel {path}: file is truncated (compressed payload runs past the end)")

    # -- entry mode -------------------------------------------------------------------------
    xlf = hdr.xloadflags if ver >= PROTOCOL_XLOADFLAGS else 0
    can64 = bool(xlf & XLoadFlags.KERNEL_64)
    if entry not in ("auto", "64", "32"):
        raise BootImageError(f"kernel {path}: unknown entry mode {entry!r} (use auto, 64 or 32)")
    if entry == "64" and not can64:
        why = ("its boot protocol predates xloadflags" if ver < PROTOCOL_XLOADFLAGS
               else "XLF_KERNEL_64 is not set (a 32-bit kernel?)")
        raise BootImageError(f"kernel {path}: no 64-bit entry point: {why}; use the 32-bit entry")
    mode = "64" if entry == "64" or (entry == "auto" and can64) else "32"

    # -- where the kernel goes --------------------------------------------------------------
    relocatable = bool(hdr.relocatable_kernel)
    align = hdr.kernel_alignment if relocatable and hdr.kernel_alignment else layout.PAGE_SIZE
    if align & (align - 1):
        raise BootImageError(f"kernel {path}: kernel_alignment {align:#x} is not a power of two")
    init_size = hdr.init_size if ver >= PROTOCOL_PREF_ADDRESS else 0
    need = max(init_size, len(kernel))
    candidates = []
    if relocatable and ver >= PROTOCOL_PREF_ADDRESS and hdr.pref_address:
        candidates.append(layout.align_up(hdr.pref_address, align))
    candidates.append(layout.HIGH_MEMORY_START)
    load_addr = next((a for a in candidates if a + need <= memory.below_4g and in_ram(e820, a, need)), None)
    if load_addr is None:
        raise BootImageError(f"kernel {path}: needs {need >> 20} MiB of RAM from {candidates[-1]:#x} "
                             f"(init_size {init_size:#x}); give the guest more memory")
    # The decompressor works in [target, target+init_size), where the target is the load address
    # or, for a relocatable kernel loaded lower, its preferred address; keep the initrd out of both.
    avoid = [(load_addr, load_addr + need)]
    if relocatable and ver >= PROTOCOL_PREF_ADDRESS and hdr.pref_address > load_addr:
        avoid.append((hdr.pref_address, hdr.pref_address + need))

    # -- command line and initrd ------------------------------------------------------------
    cmd = encode_cmdline(cmdline, path, hdr.cmdline_size)
    initrd_addr = initrd_size = 0
    if initrd:
        initrd_size = file_size(initrd, "initrd")
        if initrd_size == 0:
            raise BootImageError(f"initrd {initrd}: file is empty")
        addr_max = hdr.initrd_addr_max or layout.INITRD_ADDR_MAX_DEFAULT
        limit = min(addr_max + 1, memory.below_4g)
        found = find_top_down(e820, initrd_size, limit=limit, floor=layout.HIGH_MEMORY_START,
                              align=layout.INITRD_ALIGN, avoid=avoid)
        if found is None and xlf & XLoadFlags.CAN_BE_LOADED_ABOVE_4G and memory.above_4g:
            found = find_top_down(e820, initrd_size, limit=1 << 64, floor=layout.HIGH_RAM_START,
                                  align=layout.INITRD_ALIGN)
        if found is None:
            raise BootImageError(f"initrd {initrd}: {initrd_size >> 20} MiB does not fit in guest RAM "
                                 f"below {limit:#x} next to the kernel; give the guest more memory")
        initrd_addr = found
        check_in_ram(e820, initrd_addr, initrd_size, initrd, "initrd")

    # -- zero page --------------------------------------------------------------------------
    params = BootParams()
    ctypes.memmove(ctypes.addressof(params) + SETUP_HEADER_OFFSET, data[SETUP_HEADER_OFFSET:hdr_end],
                   hdr_end - SETUP_HEADER_OFFSET)
    h = params.hdr
    h.type_of_loader = LOADER_TYPE_UNDEFINED
    h.vid_mode = VID_MODE_NORMAL
    # CAN_USE_HEAP/heap_end_ptr only matter to the real-mode setup code, which is not run here;
    # KEEP_SEGMENTS stays clear because the boot GDT provides __BOOT_DS for kernels that reload.
    h.loadflags = (h.loadflags | LoadFlags.LOADED_HIGH) & (0xFF ^ (LoadFlags.CAN_USE_HEAP | LoadFlags.KEEP_SEGMENTS))
    h.heap_end_ptr = 0
    h.code32_start = load_addr
    h.cmd_line_ptr = layout.CMDLINE_START
    h.ramdisk_image = initrd_addr & 0xFFFFFFFF
    h.ramdisk_size = initrd_size & 0xFFFFFFFF
    params.ext_ramdisk_image = initrd_addr >> 32
    params.ext_ramdisk_size = initrd_size >> 32
    h.hardware_subarch = 0
    h.setup_data = 0
    if acpi_rsdp is not None and ver >= PROTOCOL_RSDP:
        params.acpi_rsdp_addr = acpi_rsdp
    try:
        fill_e820(params, e820)
    except ValueError as e:
        raise BootImageError(f"kernel {path}: {e}") from None

    # -- write ------------------------------------------------------------------------------
    memory.write(load_addr, kernel)
    if initrd:
        load_file_into(memory, initrd_addr, initrd, initrd_size, "initrd")
    memory.write(layout.CMDLINE_START, cmd)
    memory.write(layout.ZERO_PAGE_START, bytes(params))
    layout.write_bios_data_area(memory)
    if mode == "64":
        rip = load_addr + ENTRY_64_OFFSET
        cpu = long_mode_state(memory, rip, rsi=layout.ZERO_PAGE_START)
    else:
        rip = load_addr
        cpu = protected_mode_state(memory, rip, regs={"rsi": layout.ZERO_PAGE_START})
    info = {
        "protocol": _version(ver), "mode": mode, "load_addr": load_addr, "kernel_size": len(kernel),
        "init_size": init_size, "zero_page": layout.ZERO_PAGE_START, "cmdline_addr": layout.CMDLINE_START,
        "initrd_addr": initrd_addr, "initrd_size": initrd_size,
    }
    log.info("bzImage %s: protocol %s, %d-bit entry at %#x, kernel at %#x, initrd %#x+%#x",
             path, info["protocol"], int(mode), rip, load_addr, initrd_addr, initrd_size)
    return BootResult(cpu=cpu, kind="bzimage", entry=rip, info=info)
