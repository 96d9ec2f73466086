"""Guest CPUID tables, as pure functions over lists of :class:`CpuidEntry`.

An accelerator starts from what its CPU back-end can offer (KVM's
KVM_GET_SUPPORTED_CPUID, or a fixed model for tcg), then:

* :func:`apply_feature_edits` applies ``--cpu host,-cx16,+x2apic`` edits by
  feature name (an unknown name is a :class:`~pyvmm.errors.ConfigError`, a
  feature the back-end cannot offer is dropped with a warning, as QEMU does);
* :func:`add_hypervisor_leaves` sets the hypervisor bit and the KVM
  paravirtual signature leaves (0x40000000 "KVMKVMKVM");
* :func:`for_vcpu` specializes the table for one vCPU: its APIC id in leaf 1
  and the x2APIC topology leaves 0xB/0x1F, with a topology of ``ncpus``
  single-threaded cores in one package, which is what the guest's scheduler
  and its SMP bring-up code read.

Nothing here touches an accelerator, so the tcg back-end reuses all of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

from pyvmm.errors import ConfigError

log = logging.getLogger(__name__)

#: ``flags`` bit meaning "``index`` (ECX input) selects a sub-leaf" (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
FLAG_SIGNIFICANT_INDEX = 1

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001


@dataclass
class CpuidEntry:
    """One CPUID output for input (``function``, ``index``)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def get(self, reg: str) -> int:
        return getattr(self, reg)

    def set_bit(self, reg: str, bit: int, on: bool) -> None:
        v = getattr(self, reg)
        setattr(self, reg, (v | (1 << bit)) if on else (v & ~(1 << bit)))


@dataclass(frozen=True)
class FeatureBit:
    leaf: int
    subleaf: int
    reg: str
    bit: int


def _bits(leaf: int, subleaf: int, reg: str, names: dict[str, int]) -> dict[str, FeatureBit]:
    return {n: FeatureBit(leaf, subleaf, reg, b) for n, b in names.items()}


#: Feature names (QEMU spelling, with '.' and '-' folded to '_') -> where the bit lives.
FEATURES: dict[str, FeatureBit] = {
    **_bits(1, 0, "edx", {
        "fpu": 0, "vme": 1, "de": 2, "pse": 3, "tsc": 4, "msr": 5, "pae": 6, "mce": 7, "cx8": 8,
        "apic": 9, "sep": 11, "mtrr": 12, "pge": 13, "mca": 14, "cmov": 15, "pat": 16, "pse36": 17,
        "clflush": 19, "mmx": 23, "fxsr": 24, "sse": 25, "sse2": 26, "ss": 27, "ht": 28,
    }),
    **_bits(1, 0, "ecx", {
        "pni": 0, "sse3": 0, "pclmulqdq": 1, "pclmuldq": 1, "dtes64": 2, "monitor": 3, "ssse3": 9,
        "fma": 12, "cx16": 13, "pdcm": 15, "pcid": 17, "sse4_1": 19, "sse41": 19, "sse4_2": 20,
        "sse42": 20, "x2apic": 21, "movbe": 22, "popcnt": 23, "tsc_deadline": 24, "aes": 25,
        "xsave": 26, "osxsave": 27, "avx": 28, "f16c": 29, "rdrand": 30, "hypervisor": 31,
    }),
    **_bits(7, 0, "ebx", {
        "fsgsbase": 0, "tsc_adjust": 1, "bmi1": 3, "hle": 4, "avx2": 5, "smep": 7, "bmi2": 8,
        "erms": 9, "invpcid": 10, "rtm": 11, "mpx": 14, "avx512f": 16, "avx512dq": 17, "rdseed": 18,
        "adx": 19, "smap": 20, "clflushopt": 23, "clwb": 24, "avx512cd": 28, "sha_ni": 29,
        "avx512bw": 30, "avx512vl": 31,
    }),
    **_bits(7, 0, "ecx", {"umip": 2, "pku": 3, "ospke": 4, "la57": 16, "rdpid": 22}),
    **_bits(7, 0, "edx", {"md_clear": 10, "spec_ctrl": 26, "arch_capabilities": 29, "ssbd": 31}),
    **_bits(0xD, 1, "eax", {"xsaveopt": 0, "xsavec": 1, "xgetbv1": 2, "xsaves": 3}),
    **_bits(0x80000001, 0, "ecx", {"lahf_lm": 0, "abm": 5, "lzcnt": 5, "sse4a": 6, "3dnowprefetch": 8}),
    **_bits(0x80000001, 0, "edx", {"syscall": 11, "nx": 20, "xd": 20, "pdpe1gb": 26, "rdtscp": 27, "lm": 29}),
}

#: Disabling a feature also disables features that cannot work without it (as Linux's cpuid-deps).
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "xsave": ("avx", "avx2", "fma", "f16c", "avx512f", "xsaveopt", "xsavec", "xgetbv1", "xsaves"),
    "avx": ("avx2", "fma", "f16c", "avx512f"),
    "avx512f": ("avx512dq", "avx512cd", "avx512bw", "avx512vl"),
    "sse2": ("sse3", "ssse3", "sse4_1", "sse4_2", "avx"),
    "fxsr": ("sse", "sse2"),
    "apic": ("x2apic", "tsc_deadline"),
}


def normalize_feature(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


def feature_bit(name: str) -> FeatureBit:
    """Where feature ``name`` lives; raises :class:`ConfigError` for an unknown name."""
    key = normalize_feature(name)
    try:
        return FEATURES[key]
    except KeyError:
        raise ConfigError(f"--cpu: unknown CPU feature {name!r}") from None


# -- table helpers --------------------------------------------------------------------------------
def find(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry answering CPUID(``function``, ``index``), honouring the significant-index flag."""
    for e in entries:
        if e.function == function and (e.index == index or not (e.flags & FLAG_SIGNIFICANT_INDEX)):
            return e
    return None


def has_feature(entries: Iterable[CpuidEntry], name: str) -> bool:
    fb = feature_bit(name)
    e = find(entries, fb.leaf, fb.subleaf)
    return bool(e and (e.get(fb.reg) >> fb.bit) & 1)


def _ensure(entries: list[CpuidEntry], function: int, index: int = 0, flags: int = 0) -> CpuidEntry:
    e = find(entries, function, index)
    if e is None:
        e = CpuidEntry(function, index, flags)
        entries.append(e)
    return e


def copy_table(entries: Iterable[CpuidEntry]) -> list[CpuidEntry]:
    return [replace(e) for e in entries]


# -- feature edits ----------------------------------------------------------------------------------
def apply_feature_edits(entries: list[CpuidEntry], enable: Iterable[str], disable: Iterable[str],
                        supported: Iterable[CpuidEntry] | None = None) -> list[CpuidEntry]:
    """Return a copy of ``entries`` with ``+feat``/``-feat`` edits applied.

    Every name is validated first, so a typo fails even if it comes after a
    valid edit.  ``supported`` is what the back-end can offer (defaults to
    ``entries``): enabling a feature outside it is dropped with a warning.
    Disabling a feature also disables its :data:`DEPENDENTS`.
    """
    enable = [normalize_feature(n) for n in enable]
    disable = [normalize_feature(n) for n in disable]
    for n in (*enable, *disable):
        feature_bit(n)
    out = copy_table(entries)
    sup = list(supported) if supported is not None else copy_table(entries)
    for n in enable:
        if not has_feature(sup, n):
            log.warning("--cpu: this host/accelerator cannot offer feature %r; ignoring +%s", n, n)
            continue
        fb = FEATURES[n]
        _ensure(out, fb.leaf, fb.subleaf, FLAG_SIGNIFICANT_INDEX if fb.leaf in (7, 0xD) else 0).set_bit(
            fb.reg, fb.bit, True)
    todo = list(disable)
    done: set[str] = set()
    while todo:
        n = todo.pop()
        if n in done:
            continue
        done.add(n)
        fb = FEATURES[n]
        e = find(out, fb.leaf, fb.subleaf)
        if e is not None:
            e.set_bit(fb.reg, fb.bit, False)
        todo.extend(DEPENDENTS.get(n, ()))
    return out


# -- hypervisor leaves ------------------------------------------------------------------------------
def add_hypervisor_leaves(entries: list[CpuidEntry], kvm_features: int | None = None) -> list[CpuidEntry]:
    """Set CPUID.1:ECX.hypervisor and make 0x40000000 read "KVMKVMKVM" (max leaf 0x40000001).

    ``kvm_features`` (leaf 0x40000001 EAX) defaults to whatever the table
    already has; pass 0 to advertise the signature without paravirt features.
    """
    out = copy_table(entries)
    _ensure(out, 1).set_bit("ecx", 31, True)
    sig = _ensure(out, KVM_CPUID_SIGNATURE)
    sig.eax = max(sig.eax, KVM_CPUID_FEATURES)
    sig.ebx, sig.ecx, sig.edx = (int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))
    feat = _ensure(out, KVM_CPUID_FEATURES)
    if kvm_features is not None:
        feat.eax = kvm_features
    return out


# -- per-vCPU topology ----------------------------------------------------------------------------
def _width(n: int) -> int:
    """Bits needed to number ``n`` items (x2APIC id shift width)."""
    return max(n - 1, 0).bit_length()


def for_vcpu(entries: list[CpuidEntry], apic_id: int, ncpus: int) -> list[CpuidEntry]:
    """A copy of ``entries`` for the vCPU with ``apic_id``, in a package of ``ncpus`` 1-thread cores."""
    if not 1 <= ncpus <= 255 or not 0 <= apic_id < 256:
        raise ConfigError(f"unsupported vCPU topology: apic id {apic_id} of {ncpus}")
    out = copy_table(entries)
    core_bits = _width(ncpus)
    leaf1 = _ensure(out, 1)
    # EBX[31:24] initial APIC id, EBX[23:16] logical processors per package; HTT says [23:16] is valid.
    leaf1.ebx = (leaf1.ebx & 0x0000FFFF) | ((apic_id & 0xFF) << 24) | ((1 << core_bits if ncpus > 1 else 1) << 16)
    leaf1.set_bit("edx", 28, ncpus > 1)
    # Leaf 4 (deterministic cache parameters): EAX[31:26] cores per package - 1,
    # EAX[25:14] logical processors sharing this cache - 1 (the last level is shared by all).
    leaf4 = [e for e in out if e.function == 4]
    last_level = max((e.eax >> 5) & 7 for e in leaf4) if leaf4 else 0
    for e in leaf4:
        if e.eax & 0x1F == 0:
            continue  # "no more caches"
        sharing = (1 << core_bits) - 1 if (e.eax >> 5) & 7 == last_level and ncpus > 1 else 0
        e.eax = (e.eax & 0x3FFF) | (sharing << 14) | (((1 << core_bits) - 1) << 26)
    leaf0 = find(out, 0)
    basic_max = leaf0.eax if leaf0 else 0
    for leaf in (0xB, 0x1F):
        if leaf == 0x1F and basic_max < 0x1F:
            continue
        out = [e for e in out if e.function != leaf]
        levels = [(0, 1, 1), (core_bits, ncpus, 2)]  # (shift, logical processors at this level, type)
        for sub, (shift, count, typ) in enumerate(levels):
            out.append(CpuidEntry(leaf, sub, FLAG_SIGNIFICANT_INDEX, shift, count, (typ << 8) | sub, apic_id))
        out.append(CpuidEntry(leaf, len(levels), FLAG_SIGNIFICANT_INDEX, 0, 0, len(levels), apic_id))
    if basic_max < 0xB:
        _ensure(out, 0).eax = 0xB  # make the topology leaf reachable
    ext = find(out, 0x80000008)
    if ext is not None:
        # AMD: ECX[7:0] cores - 1, ECX[15:12] APIC id bits for the core number.
        ext.ecx = (ext.ecx & ~0xF0FF) | ((ncpus - 1) & 0xFF) | (core_bits << 12)
    amd_topo = find(out, 0x8000001E)
    if amd_topo is not None:
        amd_topo.eax = apic_id
        amd_topo.ebx = (amd_topo.ebx & ~0xFF) | (apic_id & 0xFF)
    return out
