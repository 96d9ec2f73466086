"""Intel MultiProcessor Specification 1.4 tables.

Without ACPI (or with ``acpi=off``) an OS finds its application processors,
the I/O APIC and the ISA interrupt wiring from these tables.  The layout
follows a PC: every CPU's local APIC id is its index, the I/O APIC gets the
next id, ISA IRQ n is wired to I/O APIC pin n except IRQ0 (the PIT) on pin 2,
the 8259 sits behind pin 0 as ExtINT, and each LAPIC has ExtINT on LINT0 and
NMI on LINT1 (virtual-wire mode).
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Sequence

from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout

MP_SPEC_REV = 4  # 1.4
LAPIC_VERSION = 0x14  # integrated APIC
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = (1 << 0) | (1 << 9)  # CPUID.1:EDX FPU | APIC
MAX_CPUS = 254  # 8-bit APIC ids, the I/O APIC takes one, 0xff is broadcast
ISA_IRQS = 16


class MpEntryType(enum.IntEnum):
    PROCESSOR = 0
    BUS = 1
    IOAPIC = 2
    IO_INTERRUPT = 3
    LOCAL_INTERRUPT = 4


class MpIrqType(enum.IntEnum):
    INT = 0
    NMI = 1
    SMI = 2
    EXTINT = 3


CPU_FLAG_ENABLED = 1
CPU_FLAG_BSP = 2


class MpFloatingPointer(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("physptr", ctypes.c_uint32),
        ("length", ctypes.c_uint8),  # in 16-byte units
        ("specification", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("feature1", ctypes.c_uint8),  # 0: a configuration table is present
        ("feature2", ctypes.c_uint8),  # bit 7 clear: virtual-wire mode, no IMCR
        ("feature3", ctypes.c_uint8 * 3),
    ]


assert ctypes.sizeof(MpFloatingPointer) == 16


class MpConfigHeader(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint16),
        ("spec", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem", ctypes.c_char * 8),
        ("product", ctypes.c_char * 12),
        ("oem_ptr", ctypes.c_uint32),
        ("oem_size", ctypes.c_uint16),
        ("entry_count", ctypes.c_uint16),
        ("lapic", ctypes.c_uint32),
        ("ext_length", ctypes.c_uint16),
        ("ext_checksum", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
    ]


assert ctypes.sizeof(MpConfigHeader) == 44


class MpProcessor(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apic_id", ctypes.c_uint8),
        ("apic_version", ctypes.c_uint8),
        ("cpu_flags", ctypes.c_uint8),
        ("signature", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 2),
    ]


assert ctypes.sizeof(MpProcessor) == 20


class MpBus(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("bus_id", ctypes.c_uint8),
        ("bus_type", ctypes.c_char * 6),
    ]


assert ctypes.sizeof(MpBus) == 8


class MpIoApic(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apic_id", ctypes.c_uint8),
        ("apic_version", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("addr", ctypes.c_uint32),
    ]


assert ctypes.sizeof(MpIoApic) == 8


class MpInterrupt(ctypes.LittleEndianStructure):
    """An I/O interrupt (type 3) or local interrupt (type 4) assignment entry."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("irq_type", ctypes.c_uint8),
        ("irq_flags", ctypes.c_uint16),  # 0: polarity/trigger conform to the bus (ISA: edge, high)
        ("src_bus", ctypes.c_uint8),
        ("src_irq", ctypes.c_uint8),
        ("dst_apic", ctypes.c_uint8),
        ("dst_pin", ctypes.c_uint8),
    ]


assert ctypes.sizeof(MpInterrupt) == 8


def _checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with a zero checksum field) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def isa_irq_pin(irq: int) -> int:
    """I/O APIC pin of ISA IRQ ``irq`` on a PC: the PIT's IRQ0 is routed to pin 2."""
    return 2 if irq == 0 else irq


def build_mptable(ncpus: int, addr: int = layout.MPTABLE_START, *, ioapic_addr: int = layout.IOAPIC_ADDR,
                  lapic_addr: int = layout.LAPIC_ADDR, apic_ids: Sequence[int] | None = None,
                  ioapic_id: int | None = None) -> bytes:
    """The floating pointer followed by the configuration table, for placement at ``addr``.

    CPU ``i`` has local APIC id ``apic_ids[i]`` (default ``i``); CPU 0 is the boot CPU
    and the I/O APIC takes ``ioapic_id`` (default: the first id after the highest).  Only present CPUs are
    listed (the MP table has no notion of hot-pluggable ones).
    """
    if not 1 <= ncpus <= MAX_CPUS:
        raise ConfigError(f"MP table: {ncpus} CPUs requested, between 1 and {MAX_CPUS} are supported")
    ids = list(range(ncpus)) if apic_ids is None else list(apic_ids)
    if len(ids) != ncpus or len(set(ids)) != ncpus or not all(0 <= a < MAX_CPUS for a in ids):
        raise ConfigError(f"MP table: APIC ids {ids} for {ncpus} CPUs must be distinct and below {MAX_CPUS}")
    if ioapic_id is None:
        ioapic_id = max(ids) + 1
    if ioapic_id in ids or not 0 <= ioapic_id < 0xFF:
        raise ConfigError(f"MP table: I/O APIC id {ioapic_id} is taken or not an APIC id")
    entries: list[ctypes.Structure] = []
    for i, apic_id in enumerate(ids):
        flags = CPU_FLAG_ENABLED | (CPU_FLAG_BSP if i == 0 else 0)
        entries.append(MpProcessor(MpEntryType.PROCESSOR, apic_id, LAPIC_VERSION, flags, CPU_SIGNATURE,
                                   CPU_FEATURES))
    entries.append(MpBus(MpEntryType.BUS, 0, b"ISA   "))
    entries.append(MpIoApic(MpEntryType.IOAPIC, ioapic_id, IOAPIC_VERSION, 1, ioapic_addr))
    # The 8259 output reaches the I/O APIC on pin 0 (used by OSes that route the timer through it).
    entries.append(MpInterrupt(MpEntryType.IO_INTERRUPT, MpIrqType.EXTINT, 0, 0, 0, ioapic_id, 0))
    for irq in range(ISA_IRQS):
        if irq == 2:
            continue  # the cascade: pin 2 carries IRQ0, and IRQ2 never reaches the bus
        entries.append(MpInterrupt(MpEntryType.IO_INTERRUPT, MpIrqType.INT, 0, 0, irq, ioapic_id,
                                   isa_irq_pin(irq)))
    entries.append(MpInterrupt(MpEntryType.LOCAL_INTERRUPT, MpIrqType.EXTINT, 0, 0, 0, 0xFF, 0))
    entries.append(MpInterrupt(MpEntryType.LOCAL_INTERRUPT, MpIrqType.NMI, 0, 0, 0, 0xFF, 1))

    body = b"".join(bytes(e) for e in entries)
    header = MpConfigHeader(b"PCMP", ctypes.sizeof(MpConfigHeader) + len(body), MP_SPEC_REV, 0,
                            b"PYVMM", b"PYVMM PC", 0, 0, len(entries), lapic_addr, 0, 0, 0)
    header.checksum = _checksum(bytes(header) + body)
    config = bytes(header) + body

    fp = MpFloatingPointer(b"_MP_", addr + ctypes.sizeof(MpFloatingPointer), 1, MP_SPEC_REV, 0, 0, 0)
    fp.checksum = _checksum(bytes(fp))
    table = bytes(fp) + config
    if len(table) > layout.MPTABLE_MAX_SIZE:
        raise ConfigError(f"MP table for {ncpus} CPUs does not fit in {layout.MPTABLE_MAX_SIZE} bytes")
    return table


def write_mptable(memory: GuestMemory, ncpus: int, *, addr: int = layout.MPTABLE_START,
                  ioapic_addr: int = layout.IOAPIC_ADDR, lapic_addr: int = layout.LAPIC_ADDR,
                  apic_ids: Sequence[int] | None = None, ioapic_id: int | None = None) -> int:
    """Write the MP tables for ``ncpus`` CPUs at ``addr``; returns the floating pointer's address.

    ``addr`` must be 16-byte aligned and inside a region an OS scans (the
    first KiB of the EBDA, the last KiB of base memory, or 0xf0000-0xfffff).
    """
    if addr % 16:
        raise ConfigError(f"MP floating pointer address {addr:#x} is not 16-byte aligned")
    table = build_mptable(ncpus, addr, ioapic_addr=ioapic_addr, lapic_addr=lapic_addr, apic_ids=apic_ids,
                          ioapic_id=ioapic_id)
    memory.write(addr, table)
    return addr
