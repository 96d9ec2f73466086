"""The ``tcg`` accelerator: unicorn vCPUs plus the userspace irqchip.

``in_kernel_irqchip`` is False: :meth:`TcgAccelerator.setup` creates
:class:`~pyvmm.machine.intc.UserspaceIrqchip` (PIC pair, PIT with port 0x61,
I/O APIC, local APICs), registers it on the machine's buses and returns it as
the interrupt sink devices drive.  Only one vCPU is supported for now; SMP
would add INIT/SIPI handling in the irqchip's ICR path (parked APs waiting
in :class:`TcgVcpu` until a SIPI sets CS:IP) and one engine per vCPU, which
this code already keeps separate.
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
            vcpu = TcgVcpu(i, ctx, chip, None, self.time_base.tsc_hz, model)  # type: ignore[arg-type]
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

    def cpu_dump(self, index: int = 0) -> str:
        if not 0 <= index < len(self.vcpus):
            return f"no vCPU {index}"
        return self.vcpus[index].dump()

    def stats(self) -> dict[str, int]:
        return self.vcpus[0].stats if self.vcpus else {}
