"""ACPI tables for the PC machine: RSDP, XSDT/RSDT, FADT, FACS, MADT and DSDT.

With these a stock guest kernel finds its CPUs and interrupt controllers
(MADT), the power-management registers of :mod:`pyvmm.devices.acpi_pm`
(FADT), how to power off (``\\_S5`` in the DSDT) and reboot (FADT reset
register), and the devices the machine describes in the DSDT (virtio-mmio
transports, optionally a PCI host bridge).  Any other device describes
itself: an object with an ``acpi_aml()`` method (:class:`AcpiDescribed`)
returns its own DSDT node, which the machine hands over in ``device_aml``
(see :func:`device_nodes`) and the DSDT places under ``\\_SB``.

All tables are packed into one region of guest RAM starting at ``base_gpa``:
the RSDP first (16-byte aligned, so Linux's scan of 0xe0000-0xfffff finds
it; the boot loader can also pass it in ``boot_params.acpi_rsdp_addr``),
the FACS (64-byte aligned), then the other tables.  The machine decides
where the region lies and must keep it out of the E820 RAM map.

The layout of each table follows the ACPI 6.x specification; structures
are ctypes records with a size check each.  Numbers that must agree with
the device model (register offsets, SLP_TYP of S5, reset value, SCI GSI)
are imported from :mod:`pyvmm.x86.pm_block`, as the device model does, so the two cannot drift.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Protocol, runtime_checkable

from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import aml, layout, pm_block

log = logging.getLogger(__name__)

OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMPC "
CREATOR_ID = b"PYVM"
CREATOR_REVISION = 1

#: Default placement: the RSDP at 0xe0000 and the tables after it, at most 64 KiB
#: (0xf0000 upward holds the MP table).
DEFAULT_BASE_GPA = 0xE0000
DEFAULT_MAX_SIZE = 0x10000
#: The I/O APIC's GSI base and pin count (24 pins, like the 82093AA and KVM's model).
IOAPIC_PINS = 24


# -- generic structures ------------------------------------------------------------------------
class AddressSpace(IntEnum):
    MEMORY = 0
    IO = 1
    PCI_CONFIG = 2


class AccessSize(IntEnum):
    UNDEFINED = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4


class Gas(ctypes.LittleEndianStructure):
    """Generic Address Structure: where a register lives."""

    _pack_ = 1
    _fields_ = [
        ("space_id", ctypes.c_uint8),
        ("bit_width", ctypes.c_uint8),
        ("bit_offset", ctypes.c_uint8),
        ("access_size", ctypes.c_uint8),
        ("address", ctypes.c_uint64),
    ]


assert ctypes.sizeof(Gas) == 12


def io_gas(port: int, nbytes: int, access: AccessSize) -> Gas:
    return Gas(AddressSpace.IO, 8 * nbytes, 0, access, port)


class SdtHeader(ctypes.LittleEndianStructure):
    """The header every system description table starts with."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint32),
        ("revision", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem_id", ctypes.c_char * 6),
        ("oem_table_id", ctypes.c_char * 8),
        ("oem_revision", ctypes.c_uint32),
        ("creator_id", ctypes.c_char * 4),
        ("creator_revision", ctypes.c_uint32),
    ]


assert ctypes.sizeof(SdtHeader) == 36


class Rsdp(ctypes.LittleEndianStructure):
    """Root System Description Pointer, revision 2 (ACPI 2.0+)."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 8),
        ("checksum", ctypes.c_uint8),  # over the first 20 bytes
        ("oem_id", ctypes.c_char * 6),
        ("revision", ctypes.c_uint8),
        ("rsdt_address", ctypes.c_uint32),
        ("length", ctypes.c_uint32),
        ("xsdt_address", ctypes.c_uint64),
        ("extended_checksum", ctypes.c_uint8),  # over all 36 bytes
        ("reserved", ctypes.c_uint8 * 3),
    ]


assert ctypes.sizeof(Rsdp) == 36


class Facs(ctypes.LittleEndianStructure):
    """Firmware ACPI Control Structure (no checksum; 64-byte aligned)."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint32),
        ("hardware_signature", ctypes.c_uint32),
        ("firmware_waking_vector", ctypes.c_uint32),
        ("global_lock", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("x_firmware_waking_vector", ctypes.c_uint64),
        ("version", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
        ("ospm_flags", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint8 * 24),
    ]


assert ctypes.sizeof(Facs) == 64


class FadtFlags(IntFlag):
    WBINVD = 1 << 0
    PROC_C1 = 1 << 2
    SLP_BUTTON = 1 << 5  # set: there is NO fixed-feature sleep button
    FIX_RTC = 1 << 6  # set: RTC wake status is not in the fixed registers
    TMR_VAL_EXT = 1 << 8  # the PM timer is 32 bits wide
    RESET_REG_SUP = 1 << 10


class BootArch(IntFlag):
    """FADT IAPC_BOOT_ARCH."""

    LEGACY_DEVICES = 1 << 0
    I8042 = 1 << 1
    VGA_NOT_PRESENT = 1 << 2
    MSI_NOT_SUPPORTED = 1 << 3
    PCIE_ASPM_CONTROLS = 1 << 4
    CMOS_RTC_NOT_PRESENT = 1 << 5


class Fadt(ctypes.LittleEndianStructure):
    """Fixed ACPI Description Table, revision 6 (276 bytes)."""

    _pack_ = 1
    _fields_ = [
        ("header", SdtHeader),
        ("firmware_ctrl", ctypes.c_uint32),
        ("dsdt", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint8),
        ("preferred_pm_profile", ctypes.c_uint8),
        ("sci_int", ctypes.c_uint16),
        ("smi_cmd", ctypes.c_uint32),
        ("acpi_enable", ctypes.c_uint8),
        ("acpi_disable", ctypes.c_uint8),
        ("s4bios_req", ctypes.c_uint8),
        ("pstate_cnt", ctypes.c_uint8),
        ("pm1a_evt_blk", ctypes.c_uint32),
        ("pm1b_evt_blk", ctypes.c_uint32),
        ("pm1a_cnt_blk", ctypes.c_uint32),
        ("pm1b_cnt_blk", ctypes.c_uint32),
        ("pm2_cnt_blk", ctypes.c_uint32),
        ("pm_tmr_blk", ctypes.c_uint32),
        ("gpe0_blk", ctypes.c_uint32),
        ("gpe1_blk", ctypes.c_uint32),
        ("pm1_evt_len", ctypes.c_uint8),
        ("pm1_cnt_len", ctypes.c_uint8),
        ("pm2_cnt_len", ctypes.c_uint8),
        ("pm_tmr_len", ctypes.c_uint8),
        ("gpe0_blk_len", ctypes.c_uint8),
        ("gpe1_blk_len", ctypes.c_uint8),
        ("gpe1_base", ctypes.c_uint8),
        ("cst_cnt", ctypes.c_uint8),
        ("p_lvl2_lat", ctypes.c_uint16),
        ("p_lvl3_lat", ctypes.c_uint16),
        ("flush_size", ctypes.c_uint16),
        ("flush_stride", ctypes.c_uint16),
        ("duty_offset", ctypes.c_uint8),
        ("duty_width", ctypes.c_uint8),
        ("day_alrm", ctypes.c_uint8),
        ("mon_alrm", ctypes.c_uint8),
        ("century", ctypes.c_uint8),
        ("iapc_boot_arch", ctypes.c_uint16),
        ("reserved1", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("reset_reg", Gas),
        ("reset_value", ctypes.c_uint8),
        ("arm_boot_arch", ctypes.c_uint16),
        ("minor_version", ctypes.c_uint8),
        ("x_firmware_ctrl", ctypes.c_uint64),
        ("x_dsdt", ctypes.c_uint64),
        ("x_pm1a_evt_blk", Gas),
        ("x_pm1b_evt_blk", Gas),
        ("x_pm1a_cnt_blk", Gas),
        ("x_pm1b_cnt_blk", Gas),
        ("x_pm2_cnt_blk", Gas),
        ("x_pm_tmr_blk", Gas),
        ("x_gpe0_blk", Gas),
        ("x_gpe1_blk", Gas),
        ("sleep_control_reg", Gas),
        ("sleep_status_reg", Gas),
        ("hypervisor_vendor_id", ctypes.c_uint64),
    ]


assert ctypes.sizeof(Fadt) == 276


# -- MADT --------------------------------------------------------------------------------------
class MadtType(IntEnum):
    LOCAL_APIC = 0
    IO_APIC = 1
    INTERRUPT_OVERRIDE = 2
    LOCAL_APIC_NMI = 4


class MpsIntiFlags(IntFlag):
    """Polarity (bits 0-1) and trigger mode (bits 2-3) of an interrupt source."""

    CONFORMS = 0
    ACTIVE_HIGH = 0x1
    ACTIVE_LOW = 0x3
    EDGE = 0x4
    LEVEL = 0xC


class MadtHeader(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("header", SdtHeader),
        ("local_apic_address", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),  # bit 0: PCAT_COMPAT (dual 8259s present)
    ]


assert ctypes.sizeof(MadtHeader) == 44


class MadtLocalApic(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("processor_uid", ctypes.c_uint8),
        ("apic_id", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),  # bit 0: enabled
    ]


assert ctypes.sizeof(MadtLocalApic) == 8


class MadtIoApic(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("io_apic_id", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("address", ctypes.c_uint32),
        ("gsi_base", ctypes.c_uint32),
    ]


assert ctypes.sizeof(MadtIoApic) == 12


class MadtInterruptOverride(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("bus", ctypes.c_uint8),  # 0: ISA
        ("source", ctypes.c_uint8),  # ISA IRQ
        ("gsi", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
    ]


assert ctypes.sizeof(MadtInterruptOverride) == 10


class MadtLocalApicNmi(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("processor_uid", ctypes.c_uint8),  # 0xff: all processors
        ("flags", ctypes.c_uint16),
        ("lint", ctypes.c_uint8),
    ]


assert ctypes.sizeof(MadtLocalApicNmi) == 6


# -- what the machine describes ----------------------------------------------------------------
@dataclass(frozen=True)
class AcpiMmioDevice:
    """A memory-mapped device described in the DSDT, e.g. a virtio-mmio transport.

    Linux's virtio-mmio driver binds to ``_HID "LNRO0005"``; ``_CRS`` carries
    the register window and the interrupt.  ``level`` describes the
    interrupt's trigger mode (virtio-mmio holds its line while
    InterruptStatus is non-zero, so level suits it); it is always active high.
    """

    name: str  # ACPI name segment, e.g. "VR00"
    hid: str  # e.g. "LNRO0005"
    uid: int
    mmio_base: int
    mmio_size: int
    gsi: int
    level: bool = True


@dataclass(frozen=True)
class AcpiPciHost:
    """A PCI host bridge (PNP0A03, configuration via ports 0xcf8/0xcfc).

    When the DSDT exists, Linux finds PCI root buses only through it, so a
    machine with PCI devices must pass one of these.  Legacy INTx are
    routed directly to I/O APIC inputs: INTA-INTD of slot ``s`` reach
    ``intx_gsis[(s + pin) % 4]`` (see :func:`pci_intx_gsi`), which the guest
    programs level-triggered, active-low.
    """

    mem32_base: int = 0xC000_0000
    mem32_limit: int = 0xFEBF_FFFF  # inclusive; stops below the I/O APIC
    mem64_base: int | None = None
    mem64_limit: int | None = None  # inclusive
    io_base: int = 0x1000
    io_limit: int = 0xFFFF  # inclusive
    bus_end: int = 0
    slots: int = 32
    intx_gsis: tuple[int, int, int, int] = (16, 17, 18, 19)


def pci_intx_gsi(host: AcpiPciHost, slot: int, pin: int) -> int:
    """GSI of INTx ``pin`` (0 = INTA) of device ``slot`` on bus 0, as the DSDT's ``_PRT`` says."""
    if not 0 <= slot < 32 or not 0 <= pin < 4:
        raise ConfigError(f"PCI slot {slot} pin {pin} out of range")
    return host.intx_gsis[(slot + pin) % 4]


@runtime_checkable
class AcpiDescribed(Protocol):
    """A device that writes its own DSDT description."""

    def acpi_aml(self) -> bytes:
        """The device's AML term(s) for ``\\_SB`` (normally one ``Device()``), encoded with :mod:`aml`."""
        ...


def device_nodes(devices: Iterable[object]) -> list[bytes]:
    """The DSDT nodes of those ``devices`` that describe themselves, in order, each once."""
    out: list[bytes] = []
    seen: set[int] = set()
    for dev in devices:
        if id(dev) in seen or not isinstance(dev, AcpiDescribed):
            continue
        seen.add(id(dev))
        out.append(dev.acpi_aml())
    return out


def _aml_device_name(node: bytes) -> str | None:
    """The NameSeg of a top-level ``Device()`` term (for duplicate checks), None for other terms."""
    if len(node) < 3 or node[0] != aml.Op.EXT_PREFIX or node[1] != aml.ExtOp.DEVICE:
        return None
    lead = node[2] >> 6
    pos = 3 + lead
    seg = node[pos:pos + 4]
    return seg.decode("ascii") if len(seg) == 4 and seg.isascii() and seg[:1] not in b"\\^./" else None


@dataclass
class AcpiImage:
    """The tables laid out for one region of guest memory."""

    base_gpa: int
    data: bytearray = field(default_factory=bytearray)
    tables: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # signature -> (gpa, bytes)
    rsdp_gpa: int = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def place(self, key: str, blob: bytes, align: int) -> int:
        """Append ``blob`` at the next ``align``-aligned address; returns its guest address."""
        pad = (-(self.base_gpa + len(self.data))) % align
        self.data += bytes(pad)
        gpa = self.base_gpa + len(self.data)
        self.data += blob
        self.tables[key] = (gpa, bytes(blob))
        return gpa

    def patch(self, gpa: int, blob: bytes) -> None:
        off = gpa - self.base_gpa
        self.data[off:off + len(blob)] = blob


# -- helpers -----------------------------------------------------------------------------------
def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with this byte added in) sum to zero mod 256."""
    return (-sum(data)) & 0xFF


def _header(signature: bytes, length: int, revision: int) -> SdtHeader:
    return SdtHeader(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, CREATOR_REVISION)


def _finish(table: bytearray) -> bytes:
    """Set the length (already right) and checksum (byte 9) of a complete table."""
    table[9] = 0
    table[9] = checksum(table)
    return bytes(table)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: header + ``body``, with length and checksum filled in."""
    table = bytearray(bytes(_header(signature, 36 + len(body), revision)) + body)
    return _finish(table)


def _check_name(name: str) -> None:
    aml.name_seg(name)  # raises ConfigError on a bad name
    if len(name) != 4:
        raise ConfigError(f"ACPI device name {name!r} must be exactly 4 characters")


# -- the tables ---------------------------------------------------------------------------------
def build_dsdt(*, ncpus: int, devices: Sequence[AcpiMmioDevice] = (), pci: AcpiPciHost | None = None,
               extra_sb_aml: bytes = b"", device_aml: Sequence[bytes] = ()) -> bytes:
    """The DSDT: processors, ``\\_S5``, the machine's devices (under ``\\_SB``).

    ``device_aml`` are the nodes self-describing devices wrote (:func:`device_nodes`).
    """
    sb: list[bytes] = []
    for i in range(ncpus):
        # Processor devices tie the MADT's processor UIDs to the namespace.
        sb.append(aml.device(f"C{i:03X}", aml.name("_HID", "ACPI0007"), aml.name("_UID", i)))
    if pci is not None:
        sb.append(_pci_host_aml(pci))
    seen: set[str] = set()
    for dev in devices:
        _check_name(dev.name)
        if dev.name in seen:
            raise ConfigError(f"ACPI device name {dev.name} is used twice")
        seen.add(dev.name)
        sb.append(aml.device(
            dev.name,
            aml.name("_HID", dev.hid),
            aml.name("_UID", dev.uid),
            aml.name("_CRS", aml.resource_template(
                aml.memory32_fixed(dev.mmio_base, dev.mmio_size),
                aml.interrupt([dev.gsi], level=dev.level),
            )),
        ))
    for node in device_aml:
        name = _aml_device_name(node)
        if name is not None:
            if name in seen:
                raise ConfigError(f"ACPI device name {name} is used twice")
            seen.add(name)
        sb.append(node)
    sb.append(extra_sb_aml)
    slp = pm_block.SLP_TYP_S5
    # Root-level names are written without "\" (the DSDT body is the root scope), as iasl does.
    body = aml.name("_S5", aml.package(slp, slp, 0, 0)) + aml.scope("_SB", *sb)
    return sdt(b"DSDT", 2, body)


def _pci_host_aml(pci: AcpiPciHost) -> bytes:
    if not 0 <= pci.bus_end <= 0xFF or not 1 <= pci.slots <= 32:
        raise ConfigError("PCI host: bus_end must be 0-255 and slots 1-32")
    if not 0xD00 <= pci.io_base <= pci.io_limit <= 0xFFFF:
        raise ConfigError("PCI host: the I/O window must lie in 0xd00-0xffff")
    res = [
        aml.word_bus_number(0, pci.bus_end),
        aml.io_port(0xCF8, 0xCF8, 1, 8),
        aml.word_io(0x0000, 0x0CF7),
        aml.word_io(pci.io_base, pci.io_limit),
        aml.dword_memory(0x000A_0000, 0x000B_FFFF),  # legacy VGA window
        aml.dword_memory(pci.mem32_base, pci.mem32_limit),
    ]
    if pci.mem64_base is not None and pci.mem64_limit is not None:
        res.append(aml.qword_memory(pci.mem64_base, pci.mem64_limit, cacheable=False))
    prt = []
    for slot in range(pci.slots):
        for pin in range(4):
            prt.append(aml.package((slot << 16) | 0xFFFF, pin, 0, pci_intx_gsi(pci, slot, pin)))
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", 0),
        aml.name("_ADR", 0),
        aml.name("_CRS", aml.resource_template(*res)),
        aml.name("_PRT", aml.package(*prt)),
    )


def build_madt(*, ncpus: int, ioapic_id: int, ioapic_addr: int, lapic_addr: int,
               apic_ids: Sequence[int] | None = None, hotplug_apic_ids: Sequence[int] = ()) -> bytes:
    """The MADT: a local APIC per CPU, the I/O APIC, ISA overrides and LINT1 NMI.

    CPU ``i`` (processor UID ``i``) has APIC id ``apic_ids[i]`` (default ``i``)
    and is enabled; the possible but absent CPUs of ``hotplug_apic_ids`` follow,
    not enabled, as QEMU lists the CPUs up to ``-smp maxcpus=``.
    """
    ids = list(range(ncpus)) if apic_ids is None else list(apic_ids)
    if len(ids) != ncpus:
        raise ConfigError(f"MADT: {len(ids)} APIC ids for {ncpus} CPUs")
    entries: list[ctypes.Structure] = []
    for uid, apic_id in enumerate([*ids, *hotplug_apic_ids]):
        entries.append(MadtLocalApic(MadtType.LOCAL_APIC, 8, uid, apic_id, 1 if uid < ncpus else 0))
    entries.append(MadtIoApic(MadtType.IO_APIC, 12, ioapic_id, 0, ioapic_addr, 0))
    # The PIT's IRQ0 arrives on pin 2 (as in the MP table).
    entries.append(MadtInterruptOverride(MadtType.INTERRUPT_OVERRIDE, 10, 0, 0, 2, MpsIntiFlags.CONFORMS))
    # The SCI is level-triggered; we drive it active high.
    sci_flags = MpsIntiFlags.ACTIVE_HIGH | MpsIntiFlags.LEVEL
    entries.append(MadtInterruptOverride(MadtType.INTERRUPT_OVERRIDE, 10, 0, pm_block.SCI_GSI,
                                         pm_block.SCI_GSI, sci_flags))
    entries.append(MadtLocalApicNmi(MadtType.LOCAL_APIC_NMI, 6, 0xFF, MpsIntiFlags.CONFORMS, 1))
    body = b"".join(bytes(e) for e in entries)
    head = MadtHeader(_header(b"APIC", ctypes.sizeof(MadtHeader) + len(body), 4), lapic_addr, 1)
    return _finish(bytearray(bytes(head) + body))


def build_fadt(*, facs_gpa: int, dsdt_gpa: int, pm_base: int, has_8042: bool = True,
               has_vga: bool = False, rtc_century: int = 0) -> bytes:
    """The FADT (revision 6) describing :class:`pyvmm.devices.acpi_pm.AcpiPm` at ``pm_base``."""
    if not 0 < pm_base <= 0xFFFF - pm_block.PM_SIZE:
        raise ConfigError(f"ACPI PM base {pm_base:#x} is not a valid I/O port range")
    f = Fadt()
    f.header = _header(b"FACP", ctypes.sizeof(Fadt), 6)
    # Only the 64-bit FACS pointer: the specification wants FIRMWARE_CTRL zero when
    # X_FIRMWARE_CTRL is set (Linux would otherwise install the FACS twice).  Both DSDT
    # pointers are allowed and let 32-bit-only OSes find it.
    f.firmware_ctrl = 0
    f.x_firmware_ctrl = facs_gpa
    f.dsdt = dsdt_gpa
    f.x_dsdt = dsdt_gpa
    f.sci_int = pm_block.SCI_GSI
    f.smi_cmd = 0  # no SMI: always in ACPI mode
    evt = pm_base + pm_block.PmReg.PM1_STS
    cnt = pm_base + pm_block.PmReg.PM1_CNT
    tmr = pm_base + pm_block.PmReg.PM_TMR
    f.pm1a_evt_blk = evt
    f.pm1a_cnt_blk = cnt
    f.pm_tmr_blk = tmr
    f.pm1_evt_len = pm_block.PM1_EVT_LEN
    f.pm1_cnt_len = pm_block.PM1_CNT_LEN
    f.pm_tmr_len = pm_block.PM_TMR_LEN
    f.x_pm1a_evt_blk = io_gas(evt, pm_block.PM1_EVT_LEN, AccessSize.WORD)
    f.x_pm1a_cnt_blk = io_gas(cnt, pm_block.PM1_CNT_LEN, AccessSize.WORD)
    f.x_pm_tmr_blk = io_gas(tmr, pm_block.PM_TMR_LEN, AccessSize.DWORD)
    f.p_lvl2_lat = 101  # > 100: C2 not supported
    f.p_lvl3_lat = 1001  # > 1000: C3 not supported
    f.century = rtc_century
    arch = BootArch.LEGACY_DEVICES
    if has_8042:
        arch |= BootArch.I8042
    if not has_vga:
        arch |= BootArch.VGA_NOT_PRESENT
    f.iapc_boot_arch = arch
    flags = FadtFlags.WBINVD | FadtFlags.PROC_C1 | FadtFlags.SLP_BUTTON | FadtFlags.FIX_RTC
    flags |= FadtFlags.RESET_REG_SUP
    if pm_block.PM_TMR_32BIT:
        flags |= FadtFlags.TMR_VAL_EXT
    f.flags = flags
    f.reset_reg = io_gas(pm_base + pm_block.PmReg.RESET, 1, AccessSize.BYTE)
    f.reset_value = pm_block.RESET_VALUE
    f.minor_version = 0
    return _finish(bytearray(bytes(f)))


def build_facs() -> bytes:
    facs = Facs()
    facs.signature = b"FACS"
    facs.length = ctypes.sizeof(Facs)
    facs.version = 2
    return bytes(facs)


def build_tables(*, ncpus: int, pm_base: int, base_gpa: int = DEFAULT_BASE_GPA,
                 max_size: int = DEFAULT_MAX_SIZE, ioapic_addr: int = layout.IOAPIC_ADDR,
                 lapic_addr: int = layout.LAPIC_ADDR, ioapic_id: int | None = None,
                 devices: Sequence[AcpiMmioDevice] = (), pci: AcpiPciHost | None = None,
                 extra_sb_aml: bytes = b"", has_8042: bool = True, has_vga: bool = False,
                 rtc_century: int = 0, device_aml: Sequence[bytes] = (),
                 apic_ids: Sequence[int] | None = None, hotplug_apic_ids: Sequence[int] = ()) -> AcpiImage:
    """Lay out all tables for a region at ``base_gpa`` (no guest memory touched).

    ``apic_ids``/``hotplug_apic_ids``: the CPUs' APIC ids, as :func:`build_madt` takes them.
    """
    if not 1 <= ncpus <= 255 or ncpus + len(hotplug_apic_ids) > 255:
        raise ConfigError(f"ACPI: {ncpus} CPUs requested; the MADT's xAPIC entries allow 1-255")
    all_ids = [*(range(ncpus) if apic_ids is None else apic_ids), *hotplug_apic_ids]
    if len(set(all_ids)) != len(all_ids) or not all(0 <= a < 0xFF for a in all_ids):
        raise ConfigError(f"ACPI: APIC ids {all_ids} must be distinct xAPIC ids below 255")
    if base_gpa % 16 or base_gpa < 0 or base_gpa + max_size > 0x1_0000_0000:
        raise ConfigError(f"ACPI table base {base_gpa:#x} must be 16-byte aligned and below 4 GiB")
    if ioapic_id is None:
        ioapic_id = max(all_ids) + 1  # as in the MP table: the first id after the CPUs
    if not 0 <= ioapic_id <= 0xFF:
        raise ConfigError(f"I/O APIC id {ioapic_id} does not fit in 8 bits")
    for dev in devices:
        if not 0 <= dev.gsi < IOAPIC_PINS:
            raise ConfigError(f"ACPI device {dev.name}: GSI {dev.gsi} is not an I/O APIC input")

    img = AcpiImage(base_gpa)
    rsdp_gpa = img.place("RSDP", bytes(ctypes.sizeof(Rsdp)), 16)  # filled in at the end
    facs_gpa = img.place("FACS", build_facs(), 64)
    dsdt_gpa = img.place("DSDT", build_dsdt(ncpus=ncpus, devices=devices, pci=pci,
                                            extra_sb_aml=extra_sb_aml, device_aml=device_aml), 16)
    fadt_gpa = img.place("FACP", build_fadt(facs_gpa=facs_gpa, dsdt_gpa=dsdt_gpa, pm_base=pm_base,
                                            has_8042=has_8042, has_vga=has_vga,
                                            rtc_century=rtc_century), 16)
    madt_gpa = img.place("APIC", build_madt(ncpus=ncpus, ioapic_id=ioapic_id, ioapic_addr=ioapic_addr,
                                            lapic_addr=lapic_addr, apic_ids=apic_ids,
                                            hotplug_apic_ids=hotplug_apic_ids), 16)
    pointers = [fadt_gpa, madt_gpa]
    xsdt_gpa = img.place("XSDT", sdt(b"XSDT", 1, b"".join(p.to_bytes(8, "little") for p in pointers)), 16)
    rsdt_gpa = img.place("RSDT", sdt(b"RSDT", 1, b"".join(p.to_bytes(4, "little") for p in pointers)), 16)

    rsdp = Rsdp(b"RSD PTR ", 0, OEM_ID, 2, rsdt_gpa, ctypes.sizeof(Rsdp), xsdt_gpa, 0)
    raw = bytearray(bytes(rsdp))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    img.patch(rsdp_gpa, bytes(raw))
    img.tables["RSDP"] = (rsdp_gpa, bytes(raw))
    img.rsdp_gpa = rsdp_gpa
    if img.size > max_size:
        raise ConfigError(f"ACPI tables need {img.size} bytes but only {max_size} are reserved "
                          f"at {base_gpa:#x}")
    return img


def build_acpi(memory: GuestMemory, *, ncpus: int, pm_base: int, base_gpa: int = DEFAULT_BASE_GPA,
               max_size: int = DEFAULT_MAX_SIZE, ioapic_addr: int = layout.IOAPIC_ADDR,
               lapic_addr: int = layout.LAPIC_ADDR, ioapic_id: int | None = None,
               devices: Sequence[AcpiMmioDevice] = (), pci: AcpiPciHost | None = None,
               extra_sb_aml: bytes = b"", has_8042: bool = True, has_vga: bool = False,
               rtc_century: int = 0, device_aml: Sequence[bytes] = (),
               apic_ids: Sequence[int] | None = None, hotplug_apic_ids: Sequence[int] = ()) -> int:
    """Build the tables and write them into guest memory at ``base_gpa``; returns the RSDP's address.

    The whole ``[base_gpa, base_gpa + max_size)`` range must be kept out of the
    E820 RAM map (it is, by default, inside the reserved 0xa0000-0xfffff hole).
    """
    img = build_tables(ncpus=ncpus, pm_base=pm_base, base_gpa=base_gpa, max_size=max_size,
                       ioapic_addr=ioapic_addr, lapic_addr=lapic_addr, ioapic_id=ioapic_id,
                       devices=devices, pci=pci, extra_sb_aml=extra_sb_aml, has_8042=has_8042,
                       has_vga=has_vga, rtc_century=rtc_century, device_aml=device_aml,
                       apic_ids=apic_ids, hotplug_apic_ids=hotplug_apic_ids)
    memory.fill(base_gpa, max_size, 0)
    memory.write(base_gpa, img.data)
    log.debug("ACPI tables: %d bytes at %#x, RSDP at %#x", img.size, base_gpa, img.rsdp_gpa)
    return img.rsdp_gpa
