"""The ``tcg`` accelerator: unicorn vCPUs plus the userspace irqchip.

The interrupt controllers live in userspace: :meth:`TcgAccelerator.setup`
asks the builder's :attr:`~pyvmm.accel.base.MachineContext.irqchip_factory`
for them (the PIC pair, PIT, I/O APIC and local APICs of
:mod:`pyvmm.devices.irqchip`, already on the buses), attaches its vCPUs and
returns them as the interrupt sink devices drive.  Its only capability is the
DMA observer: a device write to guest RAM drops translated code.

SMP (``-smp N``, up to :data:`MAX_VCPUS`) works as QEMU's single-threaded
round-robin TCG: one unicorn engine and one thread per vCPU, all mapping the
same GuestMemory, and :class:`~pyvmm.accel.tcg.turns.Turns` lets one engine
run guest code at a time (unicorn's ``lock``-prefixed instructions are not
atomic across engines).  The compiled helper shares code protection between
the engines, so a store by one vCPU drops code another vCPU translated
(pvtcg.c, "several engines").  Application processors start parked; the
LAPIC's INIT and Startup IPIs park them and start them in real mode at the
SIPI vector.  All vCPUs count the same virtual TSC.
"""

from __future__ import annotations

import logging
from typing import Any

from pyvmm.accel.base import MachineContext
from pyvmm.accel.tcg import native as nat_mod
from pyvmm.accel.tcg.cpu import CPU_MODELS, TcgVcpu
from pyvmm.accel.tcg.turns import Turns
from pyvmm.capabilities import AccelCapabilities
from pyvmm.config import CpuConfig
from pyvmm.cpu_state import CpuState
from pyvmm.errors import AccelError, ConfigError
from pyvmm.irq import CpuInterruptController, InterruptSink
from pyvmm.vmstate import VmStateError
from pyvmm.x86 import cpuid
from pyvmm.x86.cpuid import TimeBase

log = logging.getLogger(__name__)

#: vCPUs a tcg machine may have: they take turns on one host CPU at a time.
MAX_VCPUS = 8


def build_base_cpuid(native, time_base: TimeBase, cfg: CpuConfig) -> list[cpuid.CpuidEntry]:
    """The table every tcg vCPU starts from: unicorn's model through :mod:`pyvmm.x86.cpuid`.

    ``+feat`` can only turn on what the emulated table already offers (anything
    else is dropped with a warning, as on KVM); the hypervisor leaf names
    pyvmm's tcg and offers no paravirtual interface.
    """
    table = cpuid.emulated_base_table(native, time_base)
    table = cpuid.add_hypervisor_leaves(table, signature=cpuid.PYVMM_TCG_SIGNATURE)
    return cpuid.apply_feature_edits(table, cfg.enable, cfg.disable, supported=table)


class TcgAccelerator:
    """Software CPU emulation with unicorn (QEMU's TCG)."""

    name = "tcg"

    def __init__(self, time_base: TimeBase | None = None) -> None:
        self.time_base = time_base or TimeBase()
        self.ctx: MachineContext | None = None
        self.irqchip: CpuInterruptController | None = None
        self.vcpus: list[TcgVcpu] = []
        self._boot_state: CpuState | None = None
        self._started = False

    def setup(self, ctx: MachineContext) -> InterruptSink:
        if not 1 <= ctx.ncpus <= MAX_VCPUS:
            raise AccelError(f"the tcg accelerator supports 1 to {MAX_VCPUS} vCPUs (asked for {ctx.ncpus})")
        model = CPU_MODELS.get(ctx.cpu.model)
        if model is None:
            raise ConfigError(f"--cpu {ctx.cpu.model}: unknown model for tcg (known: {', '.join(CPU_MODELS)})")
        topo = ctx.topo
        if ctx.irqchip_factory is None:
            raise AccelError("the tcg accelerator needs userspace interrupt controllers (no irqchip_factory)")
        self.ctx = ctx
        chip = ctx.irqchip_factory(ctx.ncpus, self.time_base.crystal_hz)
        self.irqchip = chip
        lib = nat_mod.native().lib
        turns = Turns(on_waiting=lib.pv_set_turn_waiters) if ctx.ncpus > 1 else None
        base: list[cpuid.CpuidEntry] | None = None
        for i, apic_id in enumerate(topo.apic_ids):
            vcpu = TcgVcpu(i, ctx, chip, None, self.time_base.tsc_hz, model, turns)
            if base is None:
                base = build_base_cpuid(vcpu.native_cpuid, self.time_base, ctx.cpu)
            vcpu.cpuid = cpuid.CpuidTable(cpuid.for_vcpu(base, apic_id, topo))
            chip.attach_cpu(i, vcpu)
            self.vcpus.append(vcpu)
        if turns is not None:
            lib.pv_set_engines_shared(1)
        self._sync_tsc()
        return chip

    def capabilities(self) -> AccelCapabilities:
        return AccelCapabilities(dma_written=self.invalidate_code)

    def _sync_tsc(self) -> None:
        """Every vCPU counts the boot CPU's TSC (Linux checks that APs agree with the BSP)."""
        first = self.vcpus[0]
        for v in self.vcpus[1:]:
            v.copy_tsc_from(first)

    def set_boot_state(self, boot_cpu: CpuState, start_aps: bool) -> None:
        self._boot_state = boot_cpu
        self.vcpus[0].set_state(boot_cpu)
        for v in self.vcpus[1:]:
            v.wait_for_sipi()               # APs start when the guest sends INIT/SIPI

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
        self._sync_tsc()
        self.irqchip.reset()
        for i, v in enumerate(self.vcpus):
            self.irqchip.attach_cpu(i, v)

    # -- VM state (pyvmm.vmstate; accel/state.py's StatefulAccelerator) ------------------------------
    def save_state(self) -> dict[str, Any]:
        """Every vCPU's state (threads paused or not started).  The userspace irqchip is a device:
        the machine saves it."""
        from pyvmm.accel.tcg import snapshot

        return {"accel": self.name, "version": snapshot.VERSION, "vcpus": [snapshot.save_vcpu(v) for v in self.vcpus]}

    def load_state(self, state: dict[str, Any]) -> None:
        """Before :meth:`start`, instead of :meth:`set_boot_state`."""
        from pyvmm.accel.tcg import snapshot

        if state.get("accel") != self.name:
            raise VmStateError(f"the stream holds {state.get('accel')} vCPU state; this machine runs tcg")
        vcpus = state.get("vcpus")
        if not isinstance(vcpus, list) or len(vcpus) != len(self.vcpus):
            raise VmStateError("the stream's vCPU count does not match this machine")
        for v, st in zip(self.vcpus, vcpus, strict=True):
            if not isinstance(st, dict):
                raise VmStateError("VM state stream corrupt: bad vCPU state")
            snapshot.load_vcpu(v, st)

    def invalidate_code(self, gpa: int, length: int) -> None:
        """Host code wrote guest RAM (DMA): drop translated code for it.  Safe from any thread.

        Unicorn notices guest stores to pages it has translated, but not writes made through
        GuestMemory by devices; a page that once held executed code and is refilled by DMA
        (e.g. the page cache reading a binary from disk) would otherwise run stale code.
        """
        for v in self.vcpus:
            v.invalidate_code(gpa, length)

    def vcpu_thread_ids(self) -> list[int | None]:
        return [v.thread_id for v in self.vcpus]

    def cpu_dump(self, index: int = 0) -> str:
        if not 0 <= index < len(self.vcpus):
            return f"no vCPU {index}"
        return self.vcpus[index].dump()

    def stats(self) -> dict[str, int]:
        return self.vcpus[0].stats if self.vcpus else {}
