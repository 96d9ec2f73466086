"""Guest CPUID tables, as pure functions over lists of :class:`CpuidEntry`.

An accelerator starts from what its CPU back-end can offer (KVM's
KVM_GET_SUPPORTED_CPUID, or a fixed model for tcg), then:

* :func:`apply_feature_edits` applies ``--cpu host,-cx16,+x2apic`` edits by
  feature name (an unknown name is a :class:`~pyvmm.errors.ConfigError`, a
  feature the back-end cannot offer is dropped with a warning, as QEMU does);
* :func:`add_hypervisor_leaves` sets the hypervisor bit and the KVM
  paravirtual signature leaves (0x40000000 "KVMKVMKVM");
* :func:`for_vcpu` specializes the table for one vCPU of a
  :class:`~pyvmm.x86.topology.CpuTopology` (``-smp``): its APIC id and the
  package's logical processor count in leaf 1, cores per package and cache
  sharing in leaf 4, and the x2APIC topology leaves 0xB/0x1F, which is what the
  guest's scheduler and its SMP bring-up code read.

This is the one CPUID model of pyvmm: KVM starts from KVM_GET_SUPPORTED_CPUID,
tcg from :func:`emulated_base_table` (what its software CPU model executes,
trimmed to what pyvmm's tcg emulates around it), and both go through the same
three steps.  Nothing here touches an accelerator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from pyvmm.errors import ConfigError
from pyvmm.x86.topology import CpuTopology

log = logging.getLogger(__name__)

#: ``flags`` bit meaning "``index`` (ECX input) selects a sub-leaf" (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
FLAG_SIGNIFICANT_INDEX = 1

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
#: The signature tcg shows in leaf 0x40000000 (no paravirtual interface behind it).
PYVMM_TCG_SIGNATURE = b"PyvmmTCGPyvm"

Regs = tuple[int, int, int, int]


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
    **_bits(0x80000007, 0, "edx", {"invtsc": 8}),
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
def add_hypervisor_leaves(entries: list[CpuidEntry], kvm_features: int | None = None, *,
                          signature: bytes = KVM_SIGNATURE) -> list[CpuidEntry]:
    """Set CPUID.1:ECX.hypervisor and make 0x40000000 read ``signature``.

    With the KVM signature the hypervisor range reaches 0x40000001, whose EAX
    (``kvm_features``) defaults to whatever the table already has; pass 0 to
    advertise the signature without paravirt features.  Any other signature
    (tcg's :data:`PYVMM_TCG_SIGNATURE`) offers leaf 0x40000000 alone.
    """
    if len(signature) != 12:
        raise ValueError(f"hypervisor signature {signature!r} is not 12 bytes")
    out = copy_table(entries)
    _ensure(out, 1).set_bit("ecx", 31, True)
    sig = _ensure(out, KVM_CPUID_SIGNATURE)
    sig.ebx, sig.ecx, sig.edx = (int.from_bytes(signature[i:i + 4], "little") for i in (0, 4, 8))
    if signature != KVM_SIGNATURE:
        sig.eax = KVM_CPUID_SIGNATURE
        return [e for e in out if not KVM_CPUID_SIGNATURE < e.function < 0x40000100]
    sig.eax = max(sig.eax, KVM_CPUID_FEATURES)
    feat = _ensure(out, KVM_CPUID_FEATURES)
    if kvm_features is not None:
        feat.eax = kvm_features
    return out


# -- per-vCPU topology ----------------------------------------------------------------------------
def _fill_basic_range(out: list[CpuidEntry], new_max: int) -> None:
    """Raise the highest basic leaf to ``new_max``, answering zeros for leaves the table lacks."""
    leaf0 = _ensure(out, 0)
    old_max = leaf0.eax
    if old_max >= new_max:
        return
    leaf0.eax = new_max
    for leaf in range(old_max + 1, new_max):
        if find(out, leaf) is None:
            out.append(CpuidEntry(leaf))


def _topology_leaf(leaf: int, apic_id: int, levels: list[tuple[int, int, int]]) -> list[CpuidEntry]:
    """Leaf 0xB/0x1F sub-leaves: one per (shift to the next level, logical processors, level type)."""
    out = [CpuidEntry(leaf, sub, FLAG_SIGNIFICANT_INDEX, shift, count, (typ << 8) | sub, apic_id)
           for sub, (shift, count, typ) in enumerate(levels)]
    out.append(CpuidEntry(leaf, len(levels), FLAG_SIGNIFICANT_INDEX, 0, 0, len(levels), apic_id))
    return out


LEVEL_SMT, LEVEL_CORE, LEVEL_DIE = 1, 2, 5


def for_vcpu(entries: list[CpuidEntry], apic_id: int, topology: CpuTopology | int) -> list[CpuidEntry]:
    """A copy of ``entries`` for the vCPU with ``apic_id`` in ``topology``.

    An int ``topology`` means that many single-threaded cores in one package.
    Leaf 0x1F (which has a die level) is written when the table reaches it or
    the topology has more than one die per package; the basic range is raised
    to 0xB (0x1F) when needed, as QEMU does.
    """
    topo = CpuTopology.flat(topology) if isinstance(topology, int) else topology
    if apic_id not in topo.apic_ids and apic_id not in topo.hotplug_apic_ids:
        raise ConfigError(f"unsupported vCPU topology: apic id {apic_id} is not in {topo}")
    out = copy_table(entries)
    per_core = topo.threads
    per_die = topo.cores * topo.threads
    per_pkg = topo.dies * per_die
    leaf1 = _ensure(out, 1)
    # EBX[31:24] initial APIC id, EBX[23:16] logical processors per package; HTT says [23:16] is valid.
    leaf1.ebx = (leaf1.ebx & 0x0000FFFF) | ((apic_id & 0xFF) << 24) | ((per_pkg if per_pkg > 1 else 1) << 16)
    leaf1.set_bit("edx", 28, per_pkg > 1)
    # Leaf 4 (deterministic cache parameters): EAX[31:26] addressable core ids per package - 1,
    # EAX[25:14] addressable ids sharing this cache - 1: a core's threads share L1 and L2, a die's L3.
    core_ids = 1 << (topo.pkg_offset - topo.core_offset)
    for e in out:
        if e.function != 4 or e.eax & 0x1F == 0:  # type 0: "no more caches"
            continue
        level = (e.eax >> 5) & 7
        sharing = (1 << (topo.smt_width if level <= 2 else topo.die_offset)) - 1
        e.eax = (e.eax & 0x3FFF) | (sharing << 14) | ((core_ids - 1) << 26)
    if _ensure(out, 0).eax < 0xB:
        _fill_basic_range(out, 0xB)  # make the topology leaf reachable
    if topo.dies > 1:
        _fill_basic_range(out, 0x1F)
    basic_max = _ensure(out, 0).eax
    out = [e for e in out if e.function not in (0xB, 0x1F)]
    out += _topology_leaf(0xB, apic_id, [(topo.core_offset, per_core, LEVEL_SMT),
                                         (topo.pkg_offset, per_pkg, LEVEL_CORE)])
    if basic_max >= 0x1F:
        levels = [(topo.core_offset, per_core, LEVEL_SMT), (topo.die_offset, per_die, LEVEL_CORE)]
        if topo.dies > 1:
            levels.append((topo.pkg_offset, per_pkg, LEVEL_DIE))
        out += _topology_leaf(0x1F, apic_id, levels)
    ext = find(out, 0x80000008)
    if ext is not None:
        # AMD: ECX[7:0] logical processors per package - 1, ECX[15:12] APIC id bits below the package.
        ext.ecx = (ext.ecx & ~0xF0FF) | ((per_pkg - 1) & 0xFF) | (topo.pkg_offset << 12)
    amd_topo = find(out, 0x8000001E)
    if amd_topo is not None:
        # AMD: EAX extended APIC id, EBX[15:8] threads per core - 1, EBX[7:0] core id, ECX[7:0] node id.
        amd_topo.eax = apic_id
        amd_topo.ebx = (amd_topo.ebx & ~0xFFFF) | ((per_core - 1) << 8) | ((apic_id >> topo.core_offset) & 0xFF)
        amd_topo.ecx = (amd_topo.ecx & ~0x7FF) | ((apic_id >> topo.pkg_offset) & 0xFF)
    return out


# -- a software CPU's table ---------------------------------------------------------------------
@dataclass(frozen=True)
class TimeBase:
    """Frequencies the guest is told: TSC = crystal * ratio; LAPIC timer input = crystal."""

    crystal_hz: int = 25_000_000
    tsc_ratio: int = 80

    @property
    def tsc_hz(self) -> int:
        return self.crystal_hz * self.tsc_ratio


VENDOR_INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)  # "GenuineIntel" as ebx, ecx, edx

# leaf 1 ECX: drop DTES64(2), MONITOR(3), DS_CPL(4), VMX(5), SMX(6), EIST(7), TM2(8), FMA(12),
# PDCM(15), PCID(17), DCA(18), x2APIC(21), XSAVE(26), OSXSAVE(27), AVX(28), F16C(29).
_ECX1_REMOVE = ((1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 12)
                | (1 << 15) | (1 << 17) | (1 << 18) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29))
_ECX1_TSC_DEADLINE = 1 << 24      # the LAPIC timer's TSC-deadline mode is emulated
# leaf 1 EDX: drop DS(21), ACPI(22), HTT(28, set by for_vcpu), TM(29), PBE(31).
_EDX1_REMOVE = (1 << 21) | (1 << 22) | (1 << 28) | (1 << 29) | (1 << 31)
_EDX1_APIC = 1 << 9
# leaf 7.0 EBX: keep FSGSBASE(0), BMI1(3), SMEP(7), BMI2(8), ERMS(9), ADX(19), SMAP(20), CLFLUSHOPT(23),
# SHA(29) when the model has them; drop SGX, HLE, AVX2, INVPCID, RTM, PQM, MPX, AVX512*, RDSEED, PT.
_EBX7_KEEP = (1 << 0) | (1 << 3) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 29)
# TSC_ADJUST is served by the MSR filter; with invariant TSC it tells Linux the TSC needs no
# clocksource watchdog (which would compare it with a tick count a slow emulated CPU loses
# ticks from, and demote it to the port-I/O PM timer).
_EBX7_TSC_ADJUST = 1 << 1
_ECX7_KEEP = (1 << 2) | (1 << 22)  # UMIP, RDPID
_EDX7_ARCH_CAPABILITIES = 1 << 29
_ECX81_KEEP = (1 << 0) | (1 << 5) | (1 << 8)  # LAHF_LM, ABM, 3DNOWPREFETCH
_EDX81_KEEP = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29)  # SYSCALL, NX, PDPE1GB, RDTSCP, LM


def emulated_base_table(native: Callable[[int, int], Regs], time_base: TimeBase) -> list[CpuidEntry]:
    """The starting table of a software CPU (tcg), from its model's own ``native(leaf, subleaf)``.

    What the model executes, minus what the emulation around it does not
    provide (AVX and XSAVE state, x2APIC, MONITOR/MWAIT, PCID/INVPCID, 5-level
    paging, virtualization extensions, performance monitoring), plus what a PC
    guest needs to run without special kernel options:

    * the APIC bit, since the userspace irqchip provides a local APIC;
    * leaf 0x15/0x16 with the TSC and crystal (= APIC timer) frequencies of
      ``time_base``, so Linux knows both without calibrating against the PIT;
    * the invariant-TSC and TSC_ADJUST bits, since the TSC is derived from host
      monotonic time (together they also spare the TSC Linux's clocksource watchdog);
    * ARCH_CAPABILITIES, whose MSR reports the CPU as not vulnerable to
      Meltdown-class bugs, so Linux does not turn on page table isolation,
      which is very slow under emulation.

    Topology (leaves 1, 4, 0xB) is left to :func:`for_vcpu`, the hypervisor
    leaves to :func:`add_hypervisor_leaves`.
    """
    sig = FLAG_SIGNIFICANT_INDEX
    out: list[CpuidEntry] = []

    def put(function: int, regs: Regs, index: int = 0, flags: int = 0) -> None:
        out.append(CpuidEntry(function, index, flags, *regs))

    max_basic_native = native(0, 0)[0]
    max_basic = max(0x16, max_basic_native)
    put(0, (max_basic, *VENDOR_INTEL))
    a, b, c, d = native(1, 0)
    c = (c & ~_ECX1_REMOVE) | _ECX1_TSC_DEADLINE
    d = (d & ~_EDX1_REMOVE) | _EDX1_APIC
    b = (b & 0xFFFF00FF) | (8 << 8)            # CLFLUSH line size 64 bytes
    put(1, (a, b, c, d))
    for sub in range(8):
        regs = native(4, sub)
        if regs[0] & 0x1F == 0:
            put(4, (0, 0, 0, 0), sub, sig)
            break
        put(4, (regs[0] & 0x3FF, regs[1], regs[2], regs[3]), sub, sig)  # sharing: for_vcpu
    put(5, (0, 0, 0, 0))                       # no MONITOR/MWAIT
    put(6, (0x4, 0, 0, 0))                     # ARAT: the APIC timer keeps running in idle
    _a7, b7, c7, _d7 = native(7, 0) if max_basic_native >= 7 else (0, 0, 0, 0)
    put(7, (0, (b7 & _EBX7_KEEP) | _EBX7_TSC_ADJUST, c7 & _ECX7_KEEP, _EDX7_ARCH_CAPABILITIES), 0, sig)
    put(0xA, (0, 0, 0, 0))                     # no architectural PMU
    put(0xD, (0, 0, 0, 0), 0, sig)             # no XSAVE
    put(0x15, (1, time_base.tsc_ratio, time_base.crystal_hz, 0))
    mhz = time_base.tsc_hz // 1_000_000
    put(0x16, (mhz, mhz, time_base.crystal_hz // 1_000_000, 0))
    for leaf in range(2, max_basic + 1):
        if find(out, leaf) is None and leaf not in (0xB, 0x1F):
            put(leaf, native(leaf, 0) if leaf <= max_basic_native and leaf in (2, 3) else (0, 0, 0, 0))

    max_ext = max(0x80000008, native(0x80000000, 0)[0])
    put(0x80000000, (max_ext, 0, 0, 0))
    a, b, c, d = native(0x80000001, 0)
    put(0x80000001, (a, b, c & _ECX81_KEEP, d & _EDX81_KEEP))
    for leaf in (0x80000002, 0x80000003, 0x80000004):
        put(leaf, native(leaf, 0))              # the brand string
    put(0x80000005, (0, 0, 0, 0))
    put(0x80000006, native(0x80000006, 0))
    put(0x80000007, (0, 0, 0, 1 << 8))          # invariant TSC
    a = native(0x80000008, 0)[0]
    put(0x80000008, (a or 0x3028, 0, 0, 0))     # address sizes
    for leaf in range(0x80000009, max_ext + 1):
        put(leaf, (0, 0, 0, 0))
    return out


@dataclass
class CpuidTable:
    """A CPUID table indexed for a software CPU's CPUID instruction, answered as hardware does."""

    entries: list[CpuidEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._exact: dict[tuple[int, int], Regs] = {}
        self._any: dict[int, Regs] = {}
        for e in self.entries:
            regs = (e.eax, e.ebx, e.ecx, e.edx)
            if e.flags & FLAG_SIGNIFICANT_INDEX:
                self._exact.setdefault((e.function, e.index), regs)
            else:
                self._any.setdefault(e.function, regs)
        self._indexed = {f for f, _ in self._exact}
        self.max_basic = self._any.get(0, (0, 0, 0, 0))[0]
        self.max_ext = self._any.get(0x80000000, (0, 0, 0, 0))[0]

    def _leaf(self, leaf: int, subleaf: int) -> Regs | None:
        hit = self._exact.get((leaf, subleaf)) or self._any.get(leaf)
        if hit is not None:
            return hit
        if leaf in self._indexed:
            if leaf in (0xB, 0x1F):  # past the last level: ECX echoes the sub-leaf, EDX the x2APIC id
                return (0, 0, subleaf & 0xFF, self._exact.get((leaf, 0), (0, 0, 0, 0))[3])
            return (0, 0, 0, 0)
        return None

    def lookup(self, leaf: int, subleaf: int) -> Regs:
        in_range = (leaf <= self.max_basic if leaf < 0x40000000 else
                    leaf <= self.max_ext if leaf >= 0x80000000 else True)
        hit = self._leaf(leaf, subleaf) if in_range else None
        if hit is not None:
            return hit
        if not in_range and not 0x40000000 <= leaf < 0x80000000:
            # Intel: an input above the highest basic or extended leaf answers the highest basic leaf
            return self._leaf(self.max_basic, subleaf) or (0, 0, 0, 0)
        return (0, 0, 0, 0)
