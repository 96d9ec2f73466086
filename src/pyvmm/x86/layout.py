"""Guest-physical memory map used at boot, in one place.

Everything the boot loaders write below 1 MiB lives here, so that no two
tables overlap and a reader can see the whole picture at once::

    0x00000 - 0x004ff   real-mode IVT and BIOS data area (BDA)
    0x00500 - 0x0053f   boot GDT
    0x00540 - 0x0054f   boot IDT (empty: limit 0)
    0x01000 - 0x01fff   Linux zero page (struct boot_params)
    0x02000 - 0x02fff   PVH hvm_start_info + module list + memory map
    0x03000 - 0x06fff   multiboot information area
    0x07c00 - 0x07dff   boot sector (real-mode guests only)
    0x08000 - 0x08fff   boot stack (grows down from 0x8ff0)
    0x09000             PML4
    0x0a000             PDPT
    0x0b000 - 0x2afff   page directories: 2 MiB pages, one per GiB, 32 at most
    0x30000 - 0x3ffff   kernel command line
    0x9fc00 - 0x9ffff   EBDA (reserved in E820)
    0xa0000 - 0xfffff   legacy VGA/ROM hole (reserved in E820); MP table at 0xf0000
    0x100000 -          kernel, initrd at the top of low RAM

Above RAM, the 32-bit hole holds the PCI window, the virtio-mmio windows and
the interrupt controllers; the I/O ports and GSIs of the fixed PC devices are
listed here too, so this file is the one place that says where anything is.

The boot-sector path uses only the IVT/BDA and 0x7c00 upward, so a boot
sector of up to 64 KiB may overwrite the (unused) protected-mode tables.
"""

from __future__ import annotations

from pyvmm.memory import GuestMemory, RamBackend

PAGE_SIZE = 0x1000
MIB = 1 << 20
GIB = 1 << 30

# -- real-mode area ---------------------------------------------------------------------------
IVT_START = 0x0
BDA_START = 0x400
BDA_EBDA_SEGMENT = 0x40E  # u16: segment of the EBDA
BDA_BASE_MEM_KB = 0x413  # u16: KiB of conventional memory below the EBDA

# -- protected/long-mode boot tables -----------------------------------------------------------
BOOT_GDT_START = 0x500
BOOT_GDT_MAX_ENTRIES = 8
BOOT_IDT_START = 0x540
ZERO_PAGE_START = 0x1000
PVH_INFO_START = 0x2000
PVH_INFO_SIZE = 0x1000
MULTIBOOT_INFO_START = 0x3000
MULTIBOOT_INFO_SIZE = 0x4000
BOOT_SECTOR_START = 0x7C00
BOOT_SECTOR_MAX = 0x10000
BOOT_STACK_START = 0x8000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPT_START = 0xA000
PD_START = 0xB000
PD_MAX_COUNT = 32  # page directories (1 GiB each); identity map reaches 32 GiB at most
IDENTITY_MAP_MIN = 4 * GIB  # always map the whole 32-bit space (MMIO included)
CMDLINE_START = 0x30000
CMDLINE_MAX_SIZE = 0x10000

#: End of the area pyvmm's boot tables occupy; kernels must not be loaded below it.
BOOT_TABLES_END = CMDLINE_START + CMDLINE_MAX_SIZE

# -- legacy PC holes ---------------------------------------------------------------------------
EBDA_START = 0x9FC00
EBDA_SIZE = 0x400
VGA_HOLE_START = 0xA0000
BIOS_AREA_START = 0xF0000
BIOS_AREA_END = 0x100000
LOW_RESERVED_START = EBDA_START  # reserved in E820 from here ...
LOW_RESERVED_END = 0x100000  # ... to 1 MiB
MPTABLE_START = BIOS_AREA_START  # Linux scans 0xf0000-0xfffff for "_MP_"
MPTABLE_MAX_SIZE = BIOS_AREA_END - BIOS_AREA_START

# -- kernel placement --------------------------------------------------------------------------
HIGH_MEMORY_START = 0x100000  # classic bzImage / multiboot load address (1 MiB)
INITRD_ADDR_MAX_DEFAULT = 0x37FFFFFF  # boot protocol < 2.03 limit
INITRD_ALIGN = PAGE_SIZE

# -- the 32-bit hole: PCI, device windows, interrupt controllers ------------------------------
PCI_HOLE_START = 0xC000_0000  # RAM above this goes to HIGH_RAM_START
HIGH_RAM_START = 0x1_0000_0000
PCI_MEM32_BASE = 0xC000_0000  # PCI BARs (32-bit memory window), up to just below the virtio-mmio window
PCI_MEM32_LIMIT = 0xFE9F_FFFF
PCI_IO_BASE = 0x1000  # PCI I/O BARs
PCI_IO_LIMIT = 0xFFFF
VIRTIO_MMIO_BASE = 0xFEB0_0000  # virtio-mmio windows, 0x200 bytes each (as QEMU's microvm)
VIRTIO_MMIO_SIZE = 0x200
VIRTIO_MMIO_MAX_DEVICES = 8
IOAPIC_ADDR = 0xFEC0_0000
IOAPIC_SIZE = 0x1000
LAPIC_ADDR = 0xFEE0_0000
LAPIC_SIZE = 0x1000
MSI_ADDRESS_BASE = 0xFEE0_0000  # MSI writes land in the LAPIC window (x86 MSI address format)
MSI_ADDRESS_MASK = 0xFFF0_0000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000  # VMX needs an identity-map page and a TSS, below 4 GiB, above RAM
KVM_TSS_ADDR = 0xFFFB_D000

# -- I/O ports of the fixed PC devices ----------------------------------------------------------
PIC_MASTER_PORT = 0x20
PIC_SLAVE_PORT = 0xA0
PIC_ELCR_PORT = 0x4D0
PIT_PORT = 0x40
SPEAKER_PORT = 0x61
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
RTC_PORT = 0x70
POST_PORT = 0x80  # port 0x80 (POST codes / I/O delay)
COM1_PORT = 0x3F8
COM2_PORT = 0x2F8
COM3_PORT = 0x3E8
COM4_PORT = 0x2E8
PVPANIC_PORT = 0x505  # QEMU's pvpanic ISA device
FW_CFG_PORT = 0x510  # fw_cfg selector (data at +1, DMA at +4)
ACPI_PM_PORT = 0x600  # ACPI PM block, as PIIX4's on QEMU's pc machine
PCI_CONFIG_ADDRESS_PORT = 0xCF8
PCI_CONFIG_DATA_PORT = 0xCFC
DEBUG_EXIT_PORT = 0xF4  # isa-debug-exit's default iobase, as QEMU

# -- GSIs (I/O APIC pins); 0-15 are the ISA IRQs ------------------------------------------------
PIT_GSI = 0  # routed to I/O APIC pin 2 (MADT interrupt override)
KBD_GSI = 1
COM2_GSI = 3
COM1_GSI = 4
RTC_GSI = 8
SCI_GSI = 9  # ACPI SCI, level-triggered active-high
AUX_GSI = 12  # PS/2 mouse
PCI_INTX_GSIS = (16, 17, 18, 19)  # PCI INTA-D, swizzled by slot (_PRT)
VIRTIO_MMIO_GSIS = (20, 21, 22, 23)  # virtio-mmio, round-robin, level-triggered
IOAPIC_PINS = 24


def align_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of ``align`` (a power of two or any positive integer)."""
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def pc_memory(size: int, mem_path: str | None = None, backend: RamBackend | None = None) -> GuestMemory:
    """Guest RAM as a PC lays it out: up to :data:`PCI_HOLE_START`, the rest from :data:`HIGH_RAM_START`."""
    return GuestMemory(size, mem_path, split=(PCI_HOLE_START, HIGH_RAM_START), backend=backend)


def write_bios_data_area(memory: GuestMemory) -> None:
    """Fill the two BDA words an OS reads to find the EBDA and the size of low memory.

    There is no BIOS, but Linux and other kernels read the EBDA segment at
    0x40E and the conventional-memory size at 0x413 to decide what to avoid
    below 1 MiB; pointing them at the reserved EBDA keeps them consistent
    with the E820 map.
    """
    memory.write_u16(BDA_EBDA_SEGMENT, EBDA_START >> 4)
    memory.write_u16(BDA_BASE_MEM_KB, EBDA_START // 1024)
