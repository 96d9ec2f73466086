"""Helpers for the KVM tests: assembling tiny guests and building raw VMs.

Guests are assembled with binutils (``as``/``ld``) at test time so their
source stays readable next to the assertions.  This module holds no tests.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from pyvmm.bus import Bus
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl


def assemble(source: str, org: int, bits: int = 16) -> bytes:
    """Assemble GNU-as ``source`` (Intel syntax) as flat binary loaded at guest address ``org``."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise AssertionError(f"'{tool}' (binutils) is required to assemble KVM test guests")
    mode = {16: ".code16", 32: ".code32", 64: ".code64"}[bits]
    arch = ("--64", "elf_x86_64") if bits == 64 else ("--32", "elf_i386")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "g.s").write_text(f".intel_syntax noprefix\n{mode}\n.text\n.globl _start\n_start:\n{source}\n")
        subprocess.run(["as", arch[0], "-o", str(p / "g.o"), str(p / "g.s")], check=True,
                       capture_output=True, text=True)
        subprocess.run(["ld", "-m", arch[1], f"-Ttext=0x{org:x}", "--oformat", "binary", "-e", "_start",
                        "-o", str(p / "g.bin"), str(p / "g.o")], check=True, capture_output=True, text=True)
        return (p / "g.bin").read_bytes()


def small_memory(size: int = 2 << 20) -> GuestMemory:
    return GuestMemory(size)


def buses() -> tuple[Bus, Bus]:
    return Bus("io"), Bus("mmio")


class RawGuest:
    """One VM with one vCPU and ``mem_size`` bytes of RAM at 0, no irqchip, for exit-level tests."""

    def __init__(self, code: bytes, org: int = 0x1000, state=None, mem_size: int = 1 << 20) -> None:
        from pyvmm.cpu_state import CpuState
        from pyvmm.kvm import abi
        from pyvmm.kvm.dump import apply_cpu_state
        from pyvmm.kvm.system import System

        self.system = System()
        self.mem = GuestMemory(mem_size)
        self.mem.write(org, code)
        self.vm = self.system.create_vm()
        self.vm.map_memory(self.mem)
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(self.system.supported_cpuid())
        state = state or CpuState(regs={"rip": org})
        regs = abi.KvmRegs()
        sregs = self.vcpu.get_sregs()
        apply_cpu_state(state, regs, sregs)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(regs)
        self.io_bus, self.mmio_bus = buses()
        self.control = VmControl()

    def runner(self, halt_action: str = "stop", run_call=None):
        from pyvmm.accel.kvm_vcpu import VcpuRunner

        return VcpuRunner(self.vcpu, self.io_bus, self.mmio_bus, self.control, halt_action=halt_action,
                          run_call=run_call)

    def close(self) -> None:
        self.vm.close()
        self.mem.close()
        self.system.close()

    def __enter__(self) -> RawGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
