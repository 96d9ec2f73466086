"""ACPI tables: structure parsed back, checksums, and ``iasl -d`` accepting every table."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import acpi as t
from pyvmm.x86 import pm_block as acpi_pm
from support.iasl import compile_dsl, iasl_disassemble

PM_BASE = 0x600
VIRTIO = [t.AcpiMmioDevice("VR00", "LNRO0005", 0, 0xD000_0000, 0x200, 16),
          t.AcpiMmioDevice("VR01", "LNRO0005", 1, 0xD000_0200, 0x200, 17, level=False)]


def build(**kw) -> t.AcpiImage:
    args = dict(ncpus=2, pm_base=PM_BASE, devices=VIRTIO)
    args.update(kw)
    return t.build_tables(**args)


def table_at(img: t.AcpiImage, gpa: int) -> bytes:
    off = gpa - img.base_gpa
    hdr = t.SdtHeader.from_buffer_copy(img.data, off)
    return bytes(img.data[off:off + hdr.length])


def test_rsdp_points_to_xsdt_and_rsdt_with_valid_checksums() -> None:
    img = build()
    assert img.rsdp_gpa == t.DEFAULT_BASE_GPA
    raw = bytes(img.data[:36])
    rsdp = t.Rsdp.from_buffer_copy(raw)
    assert rsdp.signature == b"RSD PTR "
    assert rsdp.revision == 2 and rsdp.length == 36
    assert sum(raw[:20]) & 0xFF == 0
    assert sum(raw) & 0xFF == 0
    xsdt = table_at(img, rsdp.xsdt_address)
    rsdt = table_at(img, rsdp.rsdt_address)
    assert xsdt[:4] == b"XSDT" and rsdt[:4] == b"RSDT"
    xptrs = [int.from_bytes(xsdt[i:i + 8], "little") for i in range(36, len(xsdt), 8)]
    rptrs = [int.from_bytes(rsdt[i:i + 4], "little") for i in range(36, len(rsdt), 4)]
    assert xptrs == rptrs
    sigs = sorted(table_at(img, p)[:4] for p in xptrs)
    assert sigs == [b"APIC", b"FACP"]
    for key, (gpa, blob) in img.tables.items():
        if key in ("RSDP", "FACS"):
            continue
        assert sum(blob) & 0xFF == 0, f"{key} checksum"
        assert t.SdtHeader.from_buffer_copy(blob).length == len(blob)
        assert gpa % 16 == 0
    assert img.tables["FACS"][0] % 64 == 0


def test_fadt_describes_the_pm_device() -> None:
    img = build()
    gpa, blob = img.tables["FACP"]
    f = t.Fadt.from_buffer_copy(blob)
    assert f.header.revision == 6 and f.header.length == 276
    assert f.sci_int == acpi_pm.SCI_GSI == 9
    assert f.smi_cmd == 0
    assert f.pm1a_evt_blk == PM_BASE + acpi_pm.PmReg.PM1_STS
    assert f.pm1a_cnt_blk == PM_BASE + acpi_pm.PmReg.PM1_CNT
    assert f.pm_tmr_blk == PM_BASE + acpi_pm.PmReg.PM_TMR
    assert (f.pm1_evt_len, f.pm1_cnt_len, f.pm_tmr_len) == (4, 2, 4)
    for gas, port, width in ((f.x_pm1a_evt_blk, f.pm1a_evt_blk, 32), (f.x_pm1a_cnt_blk, f.pm1a_cnt_blk, 16),
                             (f.x_pm_tmr_blk, f.pm_tmr_blk, 32)):
        assert (gas.space_id, gas.address, gas.bit_width) == (t.AddressSpace.IO, port, width)
    assert f.reset_reg.space_id == t.AddressSpace.IO
    assert f.reset_reg.address == PM_BASE + acpi_pm.PmReg.RESET
    assert f.reset_value == acpi_pm.RESET_VALUE
    assert f.flags & t.FadtFlags.RESET_REG_SUP
    assert f.flags & t.FadtFlags.TMR_VAL_EXT
    assert not f.flags & (1 << 20)  # not HW_REDUCED_ACPI
    assert f.flags & t.FadtFlags.SLP_BUTTON and not f.flags & (1 << 4)  # fixed power button only
    assert f.iapc_boot_arch & t.BootArch.I8042
    assert f.iapc_boot_arch & t.BootArch.LEGACY_DEVICES
    assert f.x_dsdt == f.dsdt == img.tables["DSDT"][0]
    assert f.x_firmware_ctrl == img.tables["FACS"][0] and f.firmware_ctrl == 0
    assert t.Fadt.from_buffer_copy(t.build_fadt(facs_gpa=0, dsdt_gpa=0, pm_base=PM_BASE,
                                                has_8042=False)).iapc_boot_arch & t.BootArch.I8042 == 0


def parse_madt(blob: bytes) -> list[tuple[int, bytes]]:
    entries = []
    off = ctypes.sizeof(t.MadtHeader)
    while off < len(blob):
        typ, length = blob[off], blob[off + 1]
        assert length >= 2
        entries.append((typ, blob[off:off + length]))
        off += length
    assert off == len(blob)
    return entries


@pytest.mark.parametrize("ncpus", [1, 2, 7])
def test_madt_lists_cpus_ioapic_overrides_and_nmi(ncpus: int) -> None:
    img = build(ncpus=ncpus)
    blob = img.tables["APIC"][1]
    head = t.MadtHeader.from_buffer_copy(blob)
    assert head.local_apic_address == 0xFEE00000 and head.flags == 1
    entries = parse_madt(blob)
    cpus = [t.MadtLocalApic.from_buffer_copy(b) for ty, b in entries if ty == t.MadtType.LOCAL_APIC]
    assert [(c.processor_uid, c.apic_id, c.flags) for c in cpus] == [(i, i, 1) for i in range(ncpus)]
    ioapics = [t.MadtIoApic.from_buffer_copy(b) for ty, b in entries if ty == t.MadtType.IO_APIC]
    assert [(a.io_apic_id, a.address, a.gsi_base) for a in ioapics] == [(ncpus, 0xFEC00000, 0)]
    isos = [t.MadtInterruptOverride.from_buffer_copy(b) for ty, b in entries
            if ty == t.MadtType.INTERRUPT_OVERRIDE]
    assert {(o.source, o.gsi, o.flags) for o in isos} == {(0, 2, 0), (9, 9, 0x000D)}
    nmis = [t.MadtLocalApicNmi.from_buffer_copy(b) for ty, b in entries if ty == t.MadtType.LOCAL_APIC_NMI]
    assert [(n.processor_uid, n.lint) for n in nmis] == [(0xFF, 1)]


def test_dsdt_contains_s5_cpus_and_devices() -> None:
    dsdt = build(ncpus=3).tables["DSDT"][1]
    assert b"_S5_\x12\x06\x04\x00\x00\x00\x00" in dsdt  # Package(4){0, 0, 0, 0}: SLP_TYP 0
    for i in range(3):
        assert f"C00{i}".encode() in dsdt
    assert dsdt.count(b"LNRO0005\x00") == 2
    assert b"ACPI0007" in dsdt


def test_bad_configurations_are_rejected() -> None:
    with pytest.raises(ConfigError):
        build(max_size=0x100)
    with pytest.raises(ConfigError):
        build(ncpus=0)
    with pytest.raises(ConfigError):
        build(base_gpa=0xE0008)
    with pytest.raises(ConfigError):
        build(devices=[VIRTIO[0], VIRTIO[0]])  # duplicate name
    with pytest.raises(ConfigError):
        build(devices=[t.AcpiMmioDevice("vr0", "LNRO0005", 0, 0xD0000000, 0x200, 16)])
    with pytest.raises(ConfigError):
        build(devices=[t.AcpiMmioDevice("VR00", "LNRO0005", 0, 0xD0000000, 0x200, 24)])
    with pytest.raises(ConfigError):
        build(pm_base=0xFFFF)


def test_build_acpi_writes_guest_memory_and_rsdp_is_found_by_scan() -> None:
    mem = GuestMemory(16 << 20)
    mem.fill(0xE0000, 0x20000, 0xAA)  # stale bytes in the region must be cleared
    rsdp = t.build_acpi(mem, ncpus=2, pm_base=PM_BASE, devices=VIRTIO)
    # Linux scans 0xe0000-0xfffff on 16-byte boundaries for "RSD PTR " with a valid checksum.
    found = None
    for addr in range(0xE0000, 0x100000, 16):
        if mem.read(addr, 8) == b"RSD PTR " and sum(mem.read(addr, 20)) & 0xFF == 0:
            found = addr
            break
    assert found == rsdp
    xsdt = mem.read_u64(rsdp + 24)
    length = mem.read_u32(xsdt + 4)
    assert sum(mem.read(xsdt, length)) & 0xFF == 0
    assert mem.read(t.DEFAULT_BASE_GPA + t.DEFAULT_MAX_SIZE - 16, 16) == bytes(16)
    assert mem.read_u8(t.DEFAULT_BASE_GPA + t.DEFAULT_MAX_SIZE) == 0xAA  # nothing beyond the region


def test_pci_host_bridge_routing() -> None:
    host = t.AcpiPciHost(mem64_base=0x80_0000_0000, mem64_limit=0x8F_FFFF_FFFF)
    assert t.pci_intx_gsi(host, 0, 0) == 16
    assert t.pci_intx_gsi(host, 1, 0) == 17
    assert t.pci_intx_gsi(host, 3, 3) == 18
    with pytest.raises(ConfigError):
        t.pci_intx_gsi(host, 32, 0)
    dsdt = build(pci=host).tables["DSDT"][1]
    assert b"PCI0" in dsdt and b"_PRT" in dsdt


@pytest.mark.parametrize("with_pci", [False, True])
def test_iasl_disassembles_every_table(tmp_path: Path, with_pci: bool) -> None:
    img = build(ncpus=4, pci=t.AcpiPciHost() if with_pci else None)
    for key, (_, blob) in img.tables.items():
        if key == "RSDP":
            continue
        iasl_disassemble(tmp_path, key.lower(), blob)
    madt = (tmp_path / "apic.dsl").read_text()
    assert madt.count("[Processor Local APIC]") == 4
    assert "[Interrupt Source Override]" in madt and "[Local APIC NMI]" in madt


def test_iasl_check_can_fail(tmp_path: Path) -> None:
    """The disassembly check above notices a broken checksum (so it is a real check)."""
    blob = bytearray(build().tables["APIC"][1])
    blob[40] ^= 0x10
    with pytest.raises(AssertionError, match="checksum"):
        iasl_disassemble(tmp_path, "apic", bytes(blob))


def test_dsdt_round_trips_through_iasl(tmp_path: Path) -> None:
    """Disassembling our DSDT and compiling the result with iasl gives back the same AML."""
    dsdt = build(ncpus=2, pci=t.AcpiPciHost()).tables["DSDT"][1]
    iasl_disassemble(tmp_path, "dsdt", dsdt)
    again = compile_dsl(tmp_path, tmp_path / "dsdt.dsl")
    assert again[36:] == dsdt[36:]
