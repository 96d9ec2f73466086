"""The CPUID table a tcg guest sees.

Start from what unicorn's CPU model reports (its TCG can execute those
instructions), then remove what this accelerator does not emulate (AVX and
XSAVE state, x2APIC, MONITOR/MWAIT, PCID/INVPCID, 5-level
paging, virtualization extensions, performance monitoring) and add what a
PC guest needs to run without special kernel options:

* the APIC bit, since the userspace irqchip provides a local APIC;
* leaf 0x15/0x16 with the TSC and crystal (= APIC timer) frequencies, so
  Linux knows both without calibrating against the PIT;
* the invariant-TSC and TSC_ADJUST bits, since the TSC is derived from host
  monotonic time (together they also spare the TSC Linux's clocksource watchdog);
* ARCH_CAPABILITIES, whose MSR (served by the compiled helper) reports the
  CPU as not vulnerable to Meltdown-class bugs, so Linux does not turn on page
  table isolation, which is very slow under TCG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Regs = tuple[int, int, int, int]

VENDOR_INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)  # "GenuineIntel" as ebx, ecx, edx
HYPERVISOR_SIGNATURE = b"PyvmmTCGPyvm"


@dataclass(frozen=True)
class TimeBase:
    """Frequencies the guest is told: TSC = crystal * ratio; LAPIC timer input = crystal."""

    crystal_hz: int = 25_000_000
    tsc_ratio: int = 80

    @property
    def tsc_hz(self) -> int:
        return self.crystal_hz * self.tsc_ratio


# leaf 1 ECX / EDX bits
_ECX1_REMOVE = ((1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 2) | (1 << 12)
                | (1 << 15) | (1 << 17) | (1 << 18) | (1 << 21) | (1 << 26) | (1 << 27)
                | (1 << 28) | (1 << 29))
_ECX1_HYPERVISOR = 1 << 31
_ECX1_TSC_DEADLINE = 1 << 24      # the LAPIC timer's TSC-deadline mode is emulated
_EDX1_REMOVE = (1 << 21) | (1 << 22) | (1 << 28) | (1 << 29) | (1 << 31)
_EDX1_APIC = 1 << 9
# leaf 7.0 EBX: keep FSGSBASE(0), BMI1(3), SMEP(7), BMI2(8), ERMS(9), ADX(19), SMAP(20), CLFLUSHOPT(23),
# SHA(29) when the model has them; drop TSC_ADJUST(1), SGX(2), HLE(4), AVX2(5), INVPCID(10), RTM(11),
# PQM(12), MPX(14), PQE(15), AVX512*(16,17,21,26,27,28,30,31), RDSEED(18), PT(25).
_EBX7_KEEP = (1 << 0) | (1 << 3) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 29)
# TSC_ADJUST is served by the compiled MSR filter; with invariant TSC it tells Linux the TSC
# needs no clocksource watchdog (which would otherwise compare it with a tick count that a
# slow emulated CPU loses ticks from, and demote it to the port-I/O PM timer).
_EBX7_TSC_ADJUST = 1 << 1
# leaf 7.0 ECX: keep UMIP(2), RDPID(22); drop PKU/OSPKE, LA57(16), AVX512 parts, etc.
_ECX7_KEEP = (1 << 2) | (1 << 22)
_EDX7_ARCH_CAPABILITIES = 1 << 29
# 0x80000001 ECX: keep LAHF_LM(0), ABM(5), SSE4A? no (AMD), 3DNOWPREFETCH(8); EDX keep SYSCALL, NX, PDPE1GB, RDTSCP, LM
_ECX81_KEEP = (1 << 0) | (1 << 5) | (1 << 8)
_EDX81_KEEP = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29)


@dataclass
class CpuidTable:
    """(leaf, subleaf) -> (eax, ebx, ecx, edx); subleaf -1 means 'any'."""

    entries: dict[tuple[int, int], Regs] = field(default_factory=dict)
    max_basic: int = 0
    max_ext: int = 0

    def lookup(self, leaf: int, subleaf: int) -> Regs:
        hit = self.entries.get((leaf, subleaf)) or self.entries.get((leaf, -1))
        if hit is not None:
            return hit
        if leaf >= 0x80000000:
            if leaf > self.max_ext:
                return self.entries.get((self.max_basic, -1), (0, 0, 0, 0))
            return (0, 0, 0, 0)
        if 0x40000000 <= leaf < 0x50000000:
            return (0, 0, 0, 0)
        if leaf > self.max_basic:
            # Intel: out-of-range basic leaves return the highest basic leaf
            return self.entries.get((self.max_basic, 0)) or self.entries.get((self.max_basic, -1)) or (0, 0, 0, 0)
        return (0, 0, 0, 0)


def build_table(native, cpu_index: int, ncpus: int, time_base: TimeBase,
                disable: list[str] | None = None) -> CpuidTable:
    """``native(leaf, subleaf)`` is the CPU model's own CPUID (from unicorn)."""
    t = CpuidTable()
    max_basic_native = native(0, 0)[0]
    t.max_basic = max(0x16, max_basic_native)
    e = t.entries
    e[(0, -1)] = (t.max_basic,) + VENDOR_INTEL

    a, b, c, d = native(1, 0)
    c = (c & ~_ECX1_REMOVE) | _ECX1_HYPERVISOR | _ECX1_TSC_DEADLINE
    d = (d & ~_EDX1_REMOVE) | _EDX1_APIC
    logical = 1 if ncpus == 1 else 0
    b = (b & 0x0000FFFF) | (cpu_index << 24) | (logical << 16)
    b = (b & ~0xFF00) | (8 << 8)            # CLFLUSH line size 64 bytes
    e[(1, -1)] = (a, b, c, d)

    for sub in range(8):
        regs = native(4, sub)
        if (regs[0] & 0x1F) == 0:
            e[(4, sub)] = (0, 0, 0, 0)
            break
        # one core, one thread per cache in these synthetic tables
        e[(4, sub)] = (regs[0] & 0x3FF, regs[1], regs[2], regs[3])
    e[(4, -1)] = (0, 0, 0, 0)
    e[(5, -1)] = (0, 0, 0, 0)                # no MONITOR/MWAIT
    e[(6, -1)] = (0x4, 0, 0, 0)              # ARAT: the APIC timer keeps running in idle
    a7, b7, c7, d7 = native(7, 0) if max_basic_native >= 7 else (0, 0, 0, 0)
    e[(7, 0)] = (0, (b7 & _EBX7_KEEP) | _EBX7_TSC_ADJUST, c7 & _ECX7_KEEP, _EDX7_ARCH_CAPABILITIES)
    e[(7, -1)] = (0, 0, 0, 0)
    e[(0xA, -1)] = (0, 0, 0, 0)              # no architectural PMU
    e[(0xB, 0)] = (0, 1, 0x100, cpu_index)   # SMT level: 1 thread
    e[(0xB, 1)] = (0, 1, 0x201, cpu_index)   # core level
    e[(0xB, -1)] = (0, 0, 0, cpu_index)
    e[(0xD, -1)] = (0, 0, 0, 0)              # no XSAVE
    e[(0x15, -1)] = (1, time_base.tsc_ratio, time_base.crystal_hz, 0)
    mhz = time_base.tsc_hz // 1_000_000
    e[(0x16, -1)] = (mhz, mhz, time_base.crystal_hz // 1_000_000, 0)
    for leaf in range(2, t.max_basic + 1):
        if (leaf, -1) not in e and (leaf, 0) not in e:
            e[(leaf, -1)] = native(leaf, 0) if leaf <= max_basic_native and leaf in (2, 3) else (0, 0, 0, 0)

    sig = HYPERVISOR_SIGNATURE
    e[(0x40000000, -1)] = (0x40000000, int.from_bytes(sig[0:4], "little"), int.from_bytes(sig[4:8], "little"),
                           int.from_bytes(sig[8:12], "little"))

    max_ext_native = native(0x80000000, 0)[0]
    t.max_ext = max(0x80000008, max_ext_native)
    e[(0x80000000, -1)] = (t.max_ext, 0, 0, 0)
    a, b, c, d = native(0x80000001, 0)
    e[(0x80000001, -1)] = (a, b, c & _ECX81_KEEP, d & _EDX81_KEEP)
    for leaf in (0x80000002, 0x80000003, 0x80000004):
        e[(leaf, -1)] = native(leaf, 0)
    e[(0x80000005, -1)] = (0, 0, 0, 0)
    e[(0x80000006, -1)] = native(0x80000006, 0)
    e[(0x80000007, -1)] = (0, 0, 0, 1 << 8)    # invariant TSC
    a, b, c, d = native(0x80000008, 0)
    e[(0x80000008, -1)] = (a if a else 0x3028, 0, 0, 0)
    for leaf in range(0x80000009, t.max_ext + 1):
        e.setdefault((leaf, -1), (0, 0, 0, 0))
    _apply_disables(t, disable or [])
    return t


_FEATURE_BITS = {
    # name: (leaf, subleaf, register index, bit)
    "apic": (1, -1, 3, 9), "sse4.2": (1, -1, 2, 20), "sse4.1": (1, -1, 2, 19), "popcnt": (1, -1, 2, 23),
    "movbe": (1, -1, 2, 22), "aes": (1, -1, 2, 25), "pclmulqdq": (1, -1, 2, 1), "cx16": (1, -1, 2, 13),
    "ssse3": (1, -1, 2, 9), "rdrand": (1, -1, 2, 30), "hypervisor": (1, -1, 2, 31), "smep": (7, 0, 1, 7),
    "smap": (7, 0, 1, 20), "fsgsbase": (7, 0, 1, 0), "bmi1": (7, 0, 1, 3), "bmi2": (7, 0, 1, 8),
    "erms": (7, 0, 1, 9), "adx": (7, 0, 1, 19), "umip": (7, 0, 2, 2), "rdpid": (7, 0, 2, 22),
    "arch-capabilities": (7, 0, 3, 29), "nx": (0x80000001, -1, 3, 20), "pdpe1gb": (0x80000001, -1, 3, 26),
    "rdtscp": (0x80000001, -1, 3, 27), "lahf_lm": (0x80000001, -1, 2, 0), "abm": (0x80000001, -1, 2, 5),
    "invtsc": (0x80000007, -1, 3, 8), "tsc_adjust": (7, 0, 1, 1),
    "tsc-deadline": (1, -1, 2, 24),
}


def _apply_disables(t: CpuidTable, names: list[str]) -> None:
    from pyvmm.errors import ConfigError

    for name in names:
        bit = _FEATURE_BITS.get(name)
        if bit is None:
            raise ConfigError(f"--cpu: unknown feature {name!r} for tcg (known: {', '.join(sorted(_FEATURE_BITS))})")
        leaf, sub, reg, b = bit
        regs = list(t.entries[(leaf, sub)])
        regs[reg] &= ~(1 << b)
        t.entries[(leaf, sub)] = (regs[0], regs[1], regs[2], regs[3])
