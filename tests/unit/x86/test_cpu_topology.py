"""-smp topology on the x86 floor: APIC ids (pyvmm.x86.topology), the CPUID topology leaves
(pyvmm.x86.cpuid.for_vcpu), and the ids the MADT and MP table list."""

from __future__ import annotations

import ctypes
import struct

import pytest

from pyvmm.config import SmpConfig
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import acpi, cpuid
from pyvmm.x86.cpuid import CpuidEntry
from pyvmm.x86.mptable import build_mptable
from pyvmm.x86.topology import CpuTopology

INTEL_CACHES = [  # leaf 4: L1d, L1i, L2, L3, end (EAX type/level only)
    CpuidEntry(4, 0, 1, 0x121), CpuidEntry(4, 1, 1, 0x122), CpuidEntry(4, 2, 1, 0x143),
    CpuidEntry(4, 3, 1, 0x163), CpuidEntry(4, 4, 1, 0),
]


def table(max_basic: int = 0x1F) -> list[CpuidEntry]:
    return [CpuidEntry(0, 0, 0, max_basic, 0x756E6547, 0x6C65746E, 0x49656E69),
            CpuidEntry(1, 0, 0, 0x906E9, 0x00000800, 0, 0x0F8BFBFF), *INTEL_CACHES,
            CpuidEntry(0x80000008, 0, 0, 0x3027)]


def topo(smp: str) -> CpuTopology:
    return CpuTopology.from_smp(SmpConfig.parse(smp))


# -- APIC ids -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("smp", "ids"), [
    ("1", [0]),
    ("4", [0, 1, 2, 3]),                                   # cores preferred: one package
    ("4,sockets=2,cores=2,threads=1", [0, 1, 2, 3]),
    ("6,sockets=2,cores=3", [0, 1, 2, 4, 5, 6]),           # 3 cores take 2 bits
    ("6,sockets=1,cores=3,threads=2", [0, 1, 2, 3, 4, 5]),
    ("12,sockets=2,cores=3,threads=2", [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]),
    ("6,sockets=2,dies=3,cores=1", [0, 1, 2, 4, 5, 6]),    # the die field is 2 bits wide
    ("6,sockets=2,cores=1,threads=3", [0, 1, 2, 4, 5, 6]),
])
def test_apic_ids_follow_the_qemu_encoding(smp: str, ids: list[int]) -> None:
    t = topo(smp)
    assert t.apic_ids == ids
    assert t.hotplug_apic_ids == []
    assert t.apic_id_limit == ids[-1] + 1


def test_index_fills_threads_then_cores_then_dies_then_packages() -> None:
    t = topo("16,sockets=2,dies=2,cores=2,threads=2")
    assert [t.ids(i) for i in (0, 1, 2, 4, 8, 15)] == [
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0), (1, 1, 1, 1)]
    assert (t.core_offset, t.die_offset, t.pkg_offset) == (1, 2, 3)


def test_maxcpus_gives_hotplug_ids_after_the_present_ones() -> None:
    t = topo("4,sockets=2,cores=3,maxcpus=6")
    assert t.apic_ids == [0, 1, 2, 4]
    assert t.hotplug_apic_ids == [5, 6]
    assert t.apic_id_limit == 7


def test_flat_is_plain_smp_n() -> None:
    assert CpuTopology.flat(3) == topo("3")


def test_topologies_beyond_xapic_ids_are_refused() -> None:
    with pytest.raises(ConfigError, match="APIC id 320"):
        topo("195,sockets=3,cores=65")       # 65 cores take 7 bits: package 2 would start at 256
    with pytest.raises(ConfigError, match="clusters"):
        CpuTopology.from_smp(SmpConfig(4, 1, 1, 2, 2, 1, 4))
    with pytest.raises(ConfigError):
        CpuTopology(cpus=5, cores=4)


# -- CPUID ----------------------------------------------------------------------------------------
def regs(e: CpuidEntry | None) -> tuple[int, int, int, int]:
    assert e is not None
    return (e.eax, e.ebx, e.ecx, e.edx)


def test_cpuid_for_two_packages_of_two_hyperthreaded_cores() -> None:
    t = topo("8,sockets=2,cores=2,threads=2")
    apic = t.apic_id(6)                      # package 1, core 1, thread 0
    assert apic == 6
    out = cpuid.for_vcpu(table(), apic, t)
    leaf1 = cpuid.find(out, 1)
    assert leaf1 is not None
    assert leaf1.ebx >> 24 == 6 and (leaf1.ebx >> 16) & 0xFF == 4 and leaf1.ebx & 0xFFFF == 0x0800
    assert leaf1.edx & (1 << 28)
    # 0xB: SMT level (shift 1, 2 threads), core level (shift 2 to the package, 4 per package), end.
    assert regs(cpuid.find(out, 0xB, 0)) == (1, 2, 0x100, 6)
    assert regs(cpuid.find(out, 0xB, 1)) == (2, 4, 0x201, 6)
    assert regs(cpuid.find(out, 0xB, 2)) == (0, 0, 2, 6)
    # 0x1F without dies: the same levels.
    assert [regs(cpuid.find(out, 0x1F, s)) for s in range(3)] == [(1, 2, 0x100, 6), (2, 4, 0x201, 6), (0, 0, 2, 6)]
    # Leaf 4: 2 core ids per package; L1/L2 shared by a core's 2 threads, L3 by the package's 4.
    caches = {(e.eax >> 5) & 7: e.eax for e in out if e.function == 4 and e.eax & 0x1F}
    assert {lvl: (eax >> 26, (eax >> 14) & 0xFFF) for lvl, eax in caches.items()} == {1: (1, 1), 2: (1, 1), 3: (1, 3)}
    ext = cpuid.find(out, 0x80000008)
    assert ext is not None and ext.ecx & 0xFF == 3 and (ext.ecx >> 12) & 0xF == 2


def test_cpuid_die_level_in_leaf_0x1f() -> None:
    t = topo("8,sockets=1,dies=2,cores=2,threads=2")
    apic = t.apic_id(5)                      # die 1, core 0, thread 1
    out = cpuid.for_vcpu(table(max_basic=0x16), apic, t)
    assert cpuid.find(out, 0) is not None and cpuid.find(out, 0).eax == 0x1F  # type: ignore[union-attr]
    for leaf in range(0x17, 0x1F):           # the leaves the table lacked now answer zeros
        assert regs(cpuid.find(out, leaf)) == (0, 0, 0, 0)
    assert [regs(cpuid.find(out, 0x1F, s)) for s in range(4)] == [
        (1, 2, 0x100, 5), (2, 4, 0x201, 5), (3, 8, 0x502, 5), (0, 0, 3, 5)]
    assert regs(cpuid.find(out, 0xB, 1)) == (3, 8, 0x201, 5)
    l3 = next(e.eax for e in out if e.function == 4 and (e.eax >> 5) & 7 == 3)
    assert (l3 >> 14) & 0xFFF == 3           # L3 per die: 4 logical processors


def test_cpuid_sparse_core_ids() -> None:
    t = topo("6,sockets=2,cores=3")
    out = cpuid.for_vcpu(table(), 4, t)      # vCPU 3: package 1, core 0
    assert regs(cpuid.find(out, 0xB, 1)) == (2, 3, 0x201, 4)
    assert (cpuid.find(out, 1).ebx >> 16) & 0xFF == 3  # type: ignore[union-attr]
    with pytest.raises(ConfigError):
        cpuid.for_vcpu(table(), 3, t)        # APIC id 3 is not in this topology


def test_amd_topology_leaf() -> None:
    t = topo("8,sockets=2,cores=2,threads=2")
    base = [*table(), CpuidEntry(0x8000001E, 0, 0, 0, 0x0105, 0x0301, 0)]  # host: 2 threads, core 5
    out = cpuid.for_vcpu(base, 7, t)
    assert regs(cpuid.find(out, 0x8000001E)) == (7, 0x0103, 0x0001, 0)


# -- tables ---------------------------------------------------------------------------------------
def test_madt_lists_topology_ids_and_not_enabled_hotplug_cpus() -> None:
    t = topo("4,sockets=2,cores=3,maxcpus=6")
    img = acpi.build_tables(ncpus=4, pm_base=0x600, apic_ids=t.apic_ids, hotplug_apic_ids=t.hotplug_apic_ids)
    blob = img.tables["APIC"][1]
    off, cpus, ioapics = ctypes.sizeof(acpi.MadtHeader), [], []
    while off < len(blob):
        typ, length = blob[off], blob[off + 1]
        if typ == acpi.MadtType.LOCAL_APIC:
            e = acpi.MadtLocalApic.from_buffer_copy(blob, off)
            cpus.append((e.processor_uid, e.apic_id, e.flags))
        elif typ == acpi.MadtType.IO_APIC:
            ioapics.append(acpi.MadtIoApic.from_buffer_copy(blob, off).io_apic_id)
        off += length
    assert cpus == [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 4, 1), (4, 5, 0), (5, 6, 0)]
    assert ioapics == [7]                    # the first id after every possible CPU
    with pytest.raises(ConfigError, match="distinct"):
        acpi.build_tables(ncpus=2, pm_base=0x600, apic_ids=[0, 1], hotplug_apic_ids=[1])


def test_mptable_lists_present_cpus_with_their_ids() -> None:
    t = topo("4,sockets=2,cores=3,maxcpus=6")
    blob = build_mptable(4, apic_ids=t.apic_ids, ioapic_id=t.apic_id_limit)
    mem = GuestMemory(1 << 20)
    mem.write(0xF0000, blob)
    cfg = blob[16:]
    count = struct.unpack_from("<H", cfg, 34)[0]
    off, cpus, ioapic = 44, [], None
    for _ in range(count):
        if cfg[off] == 0:
            cpus.append((cfg[off + 1], cfg[off + 3]))
            off += 20
        else:
            if cfg[off] == 2:
                ioapic = cfg[off + 1]
            off += 8
    assert cpus == [(0, 3), (1, 1), (2, 1), (4, 1)]  # (APIC id, flags: enabled, BSP on CPU 0)
    assert ioapic == 7
    with pytest.raises(ConfigError):
        build_mptable(2, apic_ids=[0, 0])
