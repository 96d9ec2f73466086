"""CPUID table building (pyvmm.x86.cpuid): pure functions, no KVM needed except the last test."""

from __future__ import annotations

import pytest

from pyvmm.errors import ConfigError
from pyvmm.x86 import cpuid
from pyvmm.x86.cpuid import CpuidEntry

LEAF1_ECX = (1 << 13) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 23) | (1 << 26) | (1 << 28)


def sample_table() -> list[CpuidEntry]:
    return [
        CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
        CpuidEntry(1, 0, 0, 0xA0678, 0x00020800, LEAF1_ECX, 0x0F8BFBFF),
        CpuidEntry(4, 0, 1, 0x4000121, 0, 0, 0),
        CpuidEntry(4, 1, 1, 0x4000143, 0, 0, 0),
        CpuidEntry(4, 2, 1, 0x4000163, 0, 0, 0),
        CpuidEntry(4, 3, 1, 0, 0, 0, 0),
        CpuidEntry(7, 0, 1, 0, (1 << 5) | (1 << 7) | (1 << 9), 1 << 16, 0),
        CpuidEntry(0xD, 1, 1, 0xF, 0, 0, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, 0x121, (1 << 11) | (1 << 20) | (1 << 29)),
        CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0, 0),
    ]


def bit(table: list[CpuidEntry], name: str) -> bool:
    return cpuid.has_feature(table, name)


def test_disable_clears_named_bits_and_dependents() -> None:
    t = sample_table()
    out = cpuid.apply_feature_edits(t, [], ["cx16", "xsave", "SSE4.2", "la57", "nx"])
    for name in ("cx16", "xsave", "sse4_2", "la57", "nx", "avx", "avx2", "xsaveopt", "xsavec"):
        assert not bit(out, name), name
    for name in ("sse4_1", "popcnt", "x2apic", "lm", "syscall", "smep", "erms"):
        assert bit(out, name), name
    # The input table is not modified.
    assert bit(t, "cx16") and bit(t, "avx")


def test_enable_only_what_is_supported() -> None:
    t = cpuid.apply_feature_edits(sample_table(), [], ["popcnt"])
    out = cpuid.apply_feature_edits(t, ["popcnt", "rdrand"], [], supported=sample_table())
    assert bit(out, "popcnt")          # supported: re-enabled
    assert not bit(out, "rdrand")      # not offered by the back-end: dropped (with a warning)


def test_unknown_feature_is_config_error_even_after_valid_ones() -> None:
    with pytest.raises(ConfigError, match="frobnicate"):
        cpuid.apply_feature_edits(sample_table(), ["avx"], ["cx16", "frobnicate"])
    with pytest.raises(ConfigError):
        cpuid.feature_bit("sse9")


@pytest.mark.parametrize("name", [
    "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "sse3", "ssse3", "sse4_1", "sse4.2",
    "cx16", "popcnt", "movbe", "xsave", "osxsave", "avx", "avx2", "x2apic", "aes", "rdrand", "pdpe1gb",
    "lm", "nx", "syscall", "rdtscp", "smep", "smap", "invpcid", "fsgsbase", "bmi1", "bmi2", "erms",
    "tsc-deadline", "hypervisor", "la57", "pcid",
])
def test_required_feature_names_are_known(name: str) -> None:
    fb = cpuid.feature_bit(name)
    assert fb.reg in ("eax", "ebx", "ecx", "edx") and 0 <= fb.bit < 32


def test_known_bit_positions() -> None:
    assert cpuid.feature_bit("cx16") == cpuid.FeatureBit(1, 0, "ecx", 13)
    assert cpuid.feature_bit("xsave") == cpuid.FeatureBit(1, 0, "ecx", 26)
    assert cpuid.feature_bit("avx2") == cpuid.FeatureBit(7, 0, "ebx", 5)
    assert cpuid.feature_bit("la57") == cpuid.FeatureBit(7, 0, "ecx", 16)
    assert cpuid.feature_bit("pdpe1gb") == cpuid.FeatureBit(0x80000001, 0, "edx", 26)
    assert cpuid.feature_bit("tsc_deadline") == cpuid.FeatureBit(1, 0, "ecx", 24)


def test_hypervisor_leaves() -> None:
    out = cpuid.add_hypervisor_leaves(sample_table())
    assert bit(out, "hypervisor")
    sig = cpuid.find(out, 0x40000000)
    assert sig is not None and sig.eax >= 0x40000001
    assert b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx)) == b"KVMKVMKVM\0\0\0"
    assert cpuid.find(out, 0x40000001) is not None


@pytest.mark.parametrize("ncpus", [1, 2, 3, 4, 8])
def test_per_vcpu_topology(ncpus: int) -> None:
    base = sample_table()
    width = (ncpus - 1).bit_length()
    for apic_id in range(ncpus):
        t = cpuid.for_vcpu(base, apic_id, ncpus)
        leaf1 = cpuid.find(t, 1)
        assert leaf1.ebx >> 24 == apic_id
        assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH size etc. kept
        assert bool(leaf1.edx & (1 << 28)) == (ncpus > 1)
        if ncpus > 1:
            assert (leaf1.ebx >> 16) & 0xFF >= ncpus
        smt = cpuid.find(t, 0xB, 0)
        core = cpuid.find(t, 0xB, 1)
        end = cpuid.find(t, 0xB, 2)
        assert (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xFF, smt.edx) == (0, 1, 1, apic_id)
        assert (core.eax, core.ebx, (core.ecx >> 8) & 0xFF, core.edx) == (width, ncpus, 2, apic_id)
        assert ((end.ecx >> 8) & 0xFF, end.ebx) == (0, 0)
        # Leaf 4: cores per package - 1 in EAX[31:26].
        for e in t:
            if e.function == 4 and e.eax & 0x1F:
                assert (e.eax >> 26) + 1 == 1 << width
        amd = cpuid.find(t, 0x80000008)
        assert amd.ecx & 0xFF == ncpus - 1
    # The base table is untouched.
    assert cpuid.find(base, 0xB) is None
    assert cpuid.find(base, 1).ebx >> 24 == 0


def test_topology_leaf_made_reachable() -> None:
    t = [CpuidEntry(0, 0, 0, 4, 0, 0, 0), CpuidEntry(1, 0, 0, 0, 0, 0, 0)]
    out = cpuid.for_vcpu(t, 1, 2)
    assert cpuid.find(out, 0).eax == 0xB
    assert cpuid.find(out, 0xB, 1).edx == 1


def test_bad_topology_rejected() -> None:
    with pytest.raises(ConfigError):
        cpuid.for_vcpu(sample_table(), 0, 0)
    with pytest.raises(ConfigError):
        cpuid.for_vcpu(sample_table(), 300, 400)


def test_significant_index_lookup() -> None:
    t = sample_table()
    assert cpuid.find(t, 4, 2).eax == 0x4000163
    assert cpuid.find(t, 1, 5) is cpuid.find(t, 1, 0)  # leaf 1 ignores the sub-leaf
    assert cpuid.find(t, 0x1234) is None
