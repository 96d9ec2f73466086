"""The ``tcg`` accelerator: unicorn vCPUs plus the userspace irqchip.

``in_kernel_irqchip`` is False: :meth:`TcgAccelerator.setup` creates
:class:`~pyvmm.machine.intc.UserspaceIrqchip` (PIC pair, PIT with port 0x61,
I/O APIC, local APICs), registers it on the machine's buses and returns it as
the interrupt sink devices drive.

Only one vCPU is supported for now.  SMP would follow from what is here:
one unicorn engine and thread per vCPU (each with its own CPUState; the
compiled helper already keeps a per-engine registry), all mapping the same
GuestMemory; LAPIC MMIO is already routed per calling thread; the ICR path
would turn INIT/SIPI into "park" and "set CS:IP = vector<<8 and run" for the
target vCPU; IPIs set CPU_INTERRUPT_HARD on the target and kick it.  The hard
part is memory-model and TB-invalidation safety across engines: a store by one
engine to code another engine has translated is not seen by the other, so
cross-engine code writes would need the ``invalidate_code`` path below.
"""

from __future__ import annotations

import logging

from pyvmm.accel.base import MachineContext
from pyvmm.accel.tcg.cpu import CPU_MODELS, TcgVcpu
from pyvmm.accel.tcg.cpuid import TimeBase, build_table
from pyvmm.cpu_state import CpuState
from pyvmm.errors import AccelError, ConfigError
from pyvmm.irq import InterruptSink
from pyvmm.machine.intc import UserspaceIrqchip

log = logging.getLogger(__name__)


class TcgAccelerator:
    """Software CPU emulation with unicorn (QEMU's TCG)."""

    name = "tcg"
    in_kernel_irqchip = False

    def __init__(self, time_base: TimeBase | None = None) -> None:
        self.time_base = time_base or TimeBase()
        self.ctx: MachineContext | None = None
        self.irqchip: UserspaceIrqchip | None = None
        self.vcpus: list[TcgVcpu] = []
        self._boot_state: CpuState | None = None
        self._started = False

    def setup(self, ctx: MachineContext) -> InterruptSink:
        if ctx.ncpus != 1:
            raise AccelError(f"the tcg accelerator supports 1 vCPU for now (asked for {ctx.ncpus}); "
                             "use -smp 1")
        model = CPU_MODELS.get(ctx.cpu.model)
        if model is None:
            raise ConfigError(f"--cpu {ctx.cpu.model}: unknown model for tcg (known: {', '.join(CPU_MODELS)})")
        if ctx.cpu.enable:
            raise ConfigError(f"--cpu: tcg cannot add features ({', '.join(ctx.cpu.enable)}); "
                              "it offers what unicorn emulates")
        self.ctx = ctx
        chip = UserspaceIrqchip(ctx.ncpus, self.time_base.crystal_hz)
        chip.register(ctx.io_bus, ctx.mmio_bus)
        self.irqchip = chip
        for i in range(ctx.ncpus):
            vcpu = TcgVcpu(i, ctx, chip, None, self.time_base.tsc_hz, model)
            vcpu.cpuid = build_table(vcpu.native_cpuid, i, ctx.ncpus, self.time_base, ctx.cpu.disable)
            chip.attach_cpu(i, vcpu)
            self.vcpus.append(vcpu)
        return chip

    def set_boot_state(self, boot_cpu: CpuState, start_aps: bool) -> None:
        self._boot_state = boot_cpu
        self.vcpus[0].set_state(boot_cpu)

    def start(self) -> None:
        assert self.irqchip is not None
        self.irqchip.start()
        for v in self.vcpus:
            v.start()
        self._started = True

    def pause(self) -> None:
        for v in self.vcpus:
            v.pause()

    def resume(self) -> None:
        for v in self.vcpus:
            v.resume()

    def stop(self) -> None:
        for v in self.vcpus:
            v.stop()
        if self.irqchip is not None:
            self.irqchip.stop()
        self._started = False

    def reset(self) -> None:
        assert self.irqchip is not None
        for v in self.vcpus:
            v.stop()
            v.resume()
            v.recreate()
        self.irqchip.reset()
        for i, v in enumerate(self.vcpus):
            self.irqchip.attach_cpu(i, v)

    def invalidate_code(self, gpa: int, length: int) -> None:
        """Host code wrote guest RAM (DMA): drop translated code for it.  Safe from any thread.

        Unicorn notices guest stores to pages it has translated, but not writes made through
        GuestMemory by devices; a page that once held executed code and is refilled by DMA
        (e.g. the page cache reading a binary from disk) would otherwise run stale code.
        """
        for v in self.vcpus:
            v.invalidate_code(gpa, length)

    def cpu_dump(self, index: int = 0) -> str:
        if not 0 <= index < len(self.vcpus):
            return f"no vCPU {index}"
        return self.vcpus[index].dump()

    def stats(self) -> dict[str, int]:
        return self.vcpus[0].stats if self.vcpus else {}
