"""Pick the boot loader by looking at the kernel file, as QEMU's ``-kernel`` does.

Order matters: a multiboot header is looked for first (a multiboot kernel
may also be an ELF or even carry a Linux header), then ELF, then the Linux
"HdrS" setup header, and last the boot-sector signature (which every
bzImage also has at offset 510).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pyvmm.boot.bootsector import is_boot_sector, load_boot_sector
from pyvmm.boot.common import BootResult, read_file
from pyvmm.boot.elf import is_elf, load_elf
from pyvmm.boot.linux import is_bzimage, load_bzimage
from pyvmm.boot.multiboot import find_header, load_multiboot
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86.e820 import E820Entry, build_e820

log = logging.getLogger(__name__)


def detect_format(data: bytes) -> str:
    """``multiboot``, ``elf``, ``bzimage``, ``bootsector`` or ``unknown``."""
    if find_header(data) is not None:
        return "multiboot"
    if is_elf(data):
        return "elf"
    if is_bzimage(data):
        return "bzimage"
    if is_boot_sector(data):
        return "bootsector"
    return "unknown"


def load_kernel(path: str, memory: GuestMemory, *, cmdline: str | None = "", initrd: str | None = None,
                e820: Sequence[E820Entry] | None = None, entry: str = "auto",
                acpi_rsdp: int | None = None) -> BootResult:
    """Load ``path`` into ``memory`` and return the boot CPU's entry state.

    ``initrd`` is one file for Linux, or a comma-separated module list for
    multiboot.  ``e820`` defaults to :func:`build_e820` of ``memory``; pass
    the machine's map when it reserves MMIO or firmware ranges.  ``entry``
    (``auto``/``64``/``32``) chooses the Linux/ELF entry mode.  Raises
    :class:`BootImageError` (one line, naming the file) for any unusable
    image; validation happens before guest memory is written.
    """
    data = read_file(path, "kernel")
    cmdline = cmdline or ""
    if e820 is None:
        e820 = build_e820(memory)
    fmt = detect_format(data)
    log.debug("kernel %s: detected %s (%d bytes)", path, fmt, len(data))
    if fmt == "multiboot":
        hdr = find_header(data)
        assert hdr is not None
        return load_multiboot(path, data, hdr, memory, cmdline=cmdline, initrd=initrd, e820=e820)
    if fmt == "elf":
        return load_elf(path, data, memory, cmdline=cmdline, initrd=initrd, e820=e820, entry=entry,
                        acpi_rsdp=acpi_rsdp)
    if fmt == "bzimage":
        return load_bzimage(path, data, memory, cmdline=cmdline, initrd=initrd, e820=e820, entry=entry,
                            acpi_rsdp=acpi_rsdp)
    if fmt == "bootsector":
        if initrd:
            raise BootImageError(f"kernel {path}: a boot sector cannot take an initrd")
        return load_boot_sector(path, data, memory)
    raise BootImageError(f"kernel {path}: unrecognised image format (not a Linux bzImage, ELF, multiboot "
                         f"kernel or boot sector)")
