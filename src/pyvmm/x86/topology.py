"""The x86 CPU topology: which APIC id each vCPU has, from ``-smp``.

An APIC id is a packed record of where a logical processor sits: the thread
within its core in the lowest bits, then the core within its die, the die
within its package, and the package above that.  Each field is as wide as
needed to number that level's members (3 cores take 2 bits, so a package of 3
cores leaves APIC id 3 unused).  The CPUID topology leaves
(:func:`pyvmm.x86.cpuid.for_vcpu`) tell the guest these widths, and the MADT
and MP table list the resulting ids; guests (Linux's ``topology_*`` files,
``/proc/cpuinfo``) derive package, core and thread numbers from them.  The
encoding and the order in which vCPU indexes fill it (threads first, then
cores, dies, packages) are the ones QEMU's PC machine uses, so the same
``-smp`` gives the same ids under both.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.config import SmpConfig
from pyvmm.errors import ConfigError

#: xAPIC ids are 8 bits, 0xFF is the broadcast id, and the I/O APIC takes the id after the CPUs.
MAX_APIC_ID = 0xFD


def width(n: int) -> int:
    """Bits needed to number ``n`` items (0 for one item)."""
    return max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class CpuTopology:
    """``sockets * dies * cores * threads`` possible CPUs, of which the first ``cpus`` are present."""

    cpus: int = 1
    sockets: int = 1
    dies: int = 1
    cores: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("cpus", "sockets", "dies", "cores", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"-smp: {name} must be at least 1")
        if self.cpus > self.maxcpus:
            raise ConfigError(f"-smp: {self.cpus} CPUs do not fit a topology of {self.maxcpus}")
        top = self.apic_id(self.maxcpus - 1)
        if top > MAX_APIC_ID:
            raise ConfigError(f"-smp: this topology needs APIC id {top}, above the xAPIC limit of {MAX_APIC_ID}")

    @classmethod
    def from_smp(cls, smp: SmpConfig) -> CpuTopology:
        if smp.clusters != 1:
            raise ConfigError("-smp: clusters are not supported by the x86 CPU topology")
        return cls(smp.cpus, smp.sockets, smp.dies, smp.cores, smp.threads)

    @classmethod
    def flat(cls, ncpus: int) -> CpuTopology:
        """``ncpus`` single-threaded cores in one package (what ``-smp N`` means)."""
        return cls(ncpus, 1, 1, max(ncpus, 1), 1)

    @property
    def maxcpus(self) -> int:
        return self.sockets * self.dies * self.cores * self.threads

    # -- APIC id fields --------------------------------------------------------------------------
    @property
    def smt_width(self) -> int:
        return width(self.threads)

    @property
    def core_width(self) -> int:
        return width(self.cores)

    @property
    def die_width(self) -> int:
        return width(self.dies)

    @property
    def core_offset(self) -> int:
        """Shift of the core number in an APIC id (= the thread field's width)."""
        return self.smt_width

    @property
    def die_offset(self) -> int:
        return self.core_offset + self.core_width

    @property
    def pkg_offset(self) -> int:
        """Shift of the package number: APIC ids of one package agree above this bit."""
        return self.die_offset + self.die_width

    def ids(self, index: int) -> tuple[int, int, int, int]:
        """(package, die, core, thread) of vCPU ``index``: threads fill a core first, as in QEMU."""
        if not 0 <= index < self.maxcpus:
            raise ValueError(f"vCPU index {index} outside a topology of {self.maxcpus}")
        thread = index % self.threads
        core = index // self.threads % self.cores
        die = index // (self.threads * self.cores) % self.dies
        pkg = index // (self.threads * self.cores * self.dies)
        return pkg, die, core, thread

    def apic_id(self, index: int) -> int:
        pkg, die, core, thread = self.ids(index)
        return (pkg << self.pkg_offset) | (die << self.die_offset) | (core << self.core_offset) | thread

    @property
    def apic_ids(self) -> list[int]:
        """APIC id of each present vCPU, by vCPU index (index 0, APIC id 0, is the boot CPU)."""
        return [self.apic_id(i) for i in range(self.cpus)]

    @property
    def hotplug_apic_ids(self) -> list[int]:
        """APIC ids of the possible but not present CPUs (``maxcpus`` > ``cpus``)."""
        return [self.apic_id(i) for i in range(self.cpus, self.maxcpus)]

    @property
    def apic_id_limit(self) -> int:
        """One more than the highest possible APIC id (the I/O APIC's id; fw_cfg's MAX_CPUS)."""
        return self.apic_id(self.maxcpus - 1) + 1
