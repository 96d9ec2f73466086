"""A timed probe: how fast does /dev/kvm run ring-0 guest code?

Hardware virtualization runs a tight real-mode loop at native speed (hundreds
of millions of instructions per second).  A KVM that has no VT-x/AMD-V and
emulates kernel-mode code (PVM) manages about a million.  The gap is three
orders of magnitude, so one short run tells them apart without guessing from
module names.
"""

from __future__ import annotations

import time

from pyvmm.errors import KvmError
from pyvmm.kvm.ioctls import ExitReason
from pyvmm.kvm.system import System
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout

CODE_GPA = 0x1000
TSS_ADDR = layout.KVM_TSS_ADDR


def _loop_code(iterations: int) -> bytes:
    """Real-mode ``mov ecx, N; 1: dec ecx; jnz 1b; hlt``: 2*N+2 instructions."""
    return (b"\x66\xb9" + iterations.to_bytes(4, "little")  # mov ecx, imm32
            + b"\x66\x49"                                    # dec ecx
            + b"\x75\xfc"                                    # jnz -4
            + b"\xf4")                                       # hlt


def ring0_instructions_per_second(iterations: int = 50_000, *, attempts: int = 3) -> float:
    """Run the loop in real mode (ring 0) and return the best instructions-per-second seen."""
    memory = GuestMemory(2 << 20)
    memory.write(CODE_GPA, _loop_code(iterations))
    best = 0.0
    try:
        with System() as kvm:
            vm = kvm.create_vm()
            try:
                vm.set_tss_addr(TSS_ADDR)
                vm.map_memory(memory)
                vcpu = vm.create_vcpu(0)
                for _ in range(attempts):
                    sregs = vcpu.get_sregs()
                    sregs.cs.base = 0
                    sregs.cs.selector = 0
                    vcpu.set_sregs(sregs)
                    regs = vcpu.get_regs()
                    regs.rip = CODE_GPA
                    regs.rflags = 2
                    vcpu.set_regs(regs)
                    start = time.perf_counter()
                    for _ in range(1000):
                        reason = vcpu.run_once()
                        if reason == ExitReason.HLT:
                            break
                        if reason not in (ExitReason.INTR, ExitReason.IO, ExitReason.MMIO):
                            raise KvmError(f"probe guest stopped with exit reason {reason}")
                    else:
                        raise KvmError("probe guest did not finish")
                    elapsed = time.perf_counter() - start
                    best = max(best, (2 * iterations + 2) / max(elapsed, 1e-9))
            finally:
                vm.close()
    finally:
        memory.close()
    return best
