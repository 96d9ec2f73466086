"""tcg's CPUID through the one model (pyvmm.x86.cpuid): the emulated base table built from
what the software CPU model reports, the same feature-edit / hypervisor / per-vCPU steps as
KVM, and :class:`CpuidTable`'s answers to the CPUID instruction."""

from __future__ import annotations

import logging

import pytest

from pyvmm.accel.tcg.accel import build_base_cpuid
from pyvmm.config import CpuConfig, SmpConfig
from pyvmm.errors import ConfigError
from pyvmm.x86 import cpuid
from pyvmm.x86.cpuid import CpuidTable, TimeBase
from pyvmm.x86.topology import CpuTopology

B = 1
AVX, XSAVE, OSXSAVE, X2APIC, MONITOR, SSE42, VMX, PCID = 28, 26, 27, 21, 3, 20, 5, 17


def native(leaf: int, sub: int) -> tuple[int, int, int, int]:
    """A Skylake-ish model as unicorn reports it (vendor, caches, features it can execute)."""
    ecx1 = sum(B << b for b in (0, 1, 9, 13, 19, SSE42, 22, 23, 25, AVX, XSAVE, OSXSAVE, X2APIC, MONITOR, VMX, PCID))
    return {
        (0, 0): (0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
        (1, 0): (0x506E3, 0x00010800 | (5 << 24), ecx1, 0x0FABFBFF | (1 << 28)),
        (2, 0): (0x1, 0, 0, 0x4D),
        (4, 0): (0x1C004121, 0x1C0003F, 0x3F, 0), (4, 1): (0x1C004122, 0x1C0003F, 0x3F, 0),
        (4, 2): (0x1C004143, 0x3C0003F, 0x3FF, 0), (4, 3): (0, 0, 0, 0),
        (7, 0): (0, (1 << 0) | (1 << 5) | (1 << 7) | (1 << 9) | (1 << 16), (1 << 2) | (1 << 16), 0),
        (0x80000000, 0): (0x80000008, 0, 0, 0),
        (0x80000001, 0): (0, 0, 0x121, (1 << 11) | (1 << 20) | (1 << 29) | (1 << 31)),
        (0x80000002, 0): (0x65746E49, 0x6F43206C, 0x50206572, 0x65636F72),
        (0x80000006, 0): (0, 0, 0x01006040, 0),
        (0x80000008, 0): (0x3027, 0, 0, 0),
    }.get((leaf, sub), (0, 0, 0, 0))


def base() -> list[cpuid.CpuidEntry]:
    return cpuid.emulated_base_table(native, TimeBase())


def test_emulated_table_keeps_what_is_emulated_and_adds_the_pc_bits() -> None:
    t = base()
    for name in ("sse4_2", "popcnt", "aes", "cx16", "apic", "tsc_deadline", "smep", "erms", "umip",
                 "arch_capabilities", "tsc_adjust", "invtsc", "nx", "lm", "syscall"):
        assert cpuid.has_feature(t, name), name
    for name in ("avx", "xsave", "osxsave", "x2apic", "monitor", "pcid", "avx2", "avx512f", "la57", "ht"):
        assert not cpuid.has_feature(t, name), name
    leaf1 = cpuid.find(t, 1)
    assert leaf1 is not None and not leaf1.ecx & (1 << VMX) and (leaf1.ebx >> 8) & 0xFF == 8
    assert cpuid.find(t, 0).eax == 0x16  # type: ignore[union-attr]  # raised to reach 0x15/0x16
    tb = TimeBase()
    assert (cpuid.find(t, 0x15).ebx, cpuid.find(t, 0x15).ecx) == (tb.tsc_ratio, tb.crystal_hz)  # type: ignore[union-attr]
    assert cpuid.find(t, 0x16).eax == tb.tsc_hz // 1_000_000  # type: ignore[union-attr]
    assert [e.index for e in t if e.function == 4] == [0, 1, 2, 3]
    assert cpuid.find(t, 0xB) is None    # topology is for_vcpu's


def test_tcg_goes_through_the_same_pipeline_as_kvm() -> None:
    t = build_base_cpuid(native, TimeBase(), CpuConfig.parse("host,-sse4.2,-invtsc,-arch-capabilities"))
    assert not cpuid.has_feature(t, "sse4_2") and not cpuid.has_feature(t, "invtsc")
    assert not cpuid.has_feature(t, "arch_capabilities") and cpuid.has_feature(t, "popcnt")
    assert cpuid.has_feature(t, "hypervisor")
    sig = cpuid.find(t, 0x40000000)
    assert sig is not None and sig.eax == 0x40000000
    assert b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx)) == b"PyvmmTCGPyvm"
    assert cpuid.find(t, 0x40000001) is None  # no paravirtual (kvmclock) interface on tcg
    with pytest.raises(ConfigError, match="frobnicate"):
        build_base_cpuid(native, TimeBase(), CpuConfig.parse("host,-frobnicate"))


def test_tcg_enable_only_what_the_model_offers(caplog: pytest.LogCaptureFixture) -> None:
    edited = build_base_cpuid(native, TimeBase(), CpuConfig.parse("host,-popcnt"))
    assert not cpuid.has_feature(edited, "popcnt")
    with caplog.at_level(logging.WARNING):
        t = build_base_cpuid(native, TimeBase(), CpuConfig.parse("host,+popcnt,+x2apic"))
    assert cpuid.has_feature(t, "popcnt") and not cpuid.has_feature(t, "x2apic")
    assert "x2apic" in caplog.text


def test_cpuid_instruction_answers_from_the_per_vcpu_table() -> None:
    topo = CpuTopology.from_smp(SmpConfig.parse("4,sockets=2,cores=2"))
    b = build_base_cpuid(native, TimeBase(), CpuConfig())
    tables = [CpuidTable(cpuid.for_vcpu(b, a, topo)) for a in topo.apic_ids]
    t3 = tables[3]
    assert t3.lookup(1, 0)[1] >> 24 == 3 and t3.lookup(1, 0)[3] & (1 << 28)
    assert t3.lookup(0xB, 0) == (0, 1, 0x100, 3)
    assert t3.lookup(0xB, 1) == (1, 2, 0x201, 3)
    assert t3.lookup(0xB, 7) == (0, 0, 7, 3)             # past the last level
    assert t3.lookup(4, 1)[0] >> 26 == 1                 # 2 core ids per package
    assert t3.lookup(4, 9) == (0, 0, 0, 0)               # an absent sub-leaf of an indexed leaf
    assert t3.lookup(5, 0) == (0, 0, 0, 0)
    assert t3.lookup(0x40000001, 0) == (0, 0, 0, 0)      # inside the hypervisor range
    top = t3.lookup(0x16, 0)
    assert t3.lookup(0x17, 0) == top and t3.lookup(0x80000009 + 0x100, 0) == top  # above range: top basic leaf
    assert t3.lookup(0x80000008, 0)[0] == 0x3027
    assert [t.lookup(1, 0)[1] >> 24 for t in tables] == [0, 1, 2, 3]
