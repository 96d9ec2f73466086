"""The interface every accelerator implements.

An accelerator owns the virtual CPUs and, where it has them, in-kernel
interrupt controllers and timers.  It is given the machine's guest memory,
buses and life-cycle mailbox, and nothing else: devices never see it.  What it
can do for devices (ioeventfd, irqfd, MSI, DMA notes) it offers as narrow
interfaces, :class:`~pyvmm.capabilities.AccelCapabilities`, which the builder
hands on.  An accelerator without in-kernel interrupt controllers asks the
builder for userspace ones through :attr:`MachineContext.irqchip_factory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pyvmm.bus import Bus
from pyvmm.capabilities import AccelCapabilities
from pyvmm.config import CpuConfig
from pyvmm.cpu_state import CpuState
from pyvmm.irq import InterruptSink, IrqchipFactory
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl
from pyvmm.x86.topology import CpuTopology


@dataclass
class MachineContext:
    """What the machine hands an accelerator."""

    memory: GuestMemory
    io_bus: Bus
    mmio_bus: Bus
    control: VmControl
    ncpus: int
    cpu: CpuConfig
    #: Userspace interrupt controllers, for an accelerator without in-kernel ones (tcg).
    irqchip_factory: IrqchipFactory | None = None
    #: ``-smp`` topology (APIC ids, CPUID topology leaves); None means ``ncpus`` cores in one package.
    topology: CpuTopology | None = None

    @property
    def topo(self) -> CpuTopology:
        topo = self.topology or CpuTopology.flat(self.ncpus)
        if topo.cpus != self.ncpus:
            raise ValueError(f"topology {topo} does not have {self.ncpus} vCPUs")
        return topo


class Accelerator(Protocol):
    """A CPU back-end.  Life cycle: setup -> set_boot_state -> start -> (pause/resume)* -> stop."""

    name: str

    def setup(self, ctx: MachineContext) -> InterruptSink:
        """Create the VM, map guest memory and interrupt controllers; return the IRQ sink for devices."""
        ...

    def capabilities(self) -> AccelCapabilities:
        """The fast paths devices may use (after :meth:`setup`); they survive :meth:`reset`."""
        ...

    def set_boot_state(self, boot_cpu: CpuState, start_aps: bool) -> None:
        """Load the boot CPU's registers.  With ``start_aps`` false, APs wait for INIT/SIPI."""
        ...

    def start(self) -> None:
        """Start one thread per vCPU."""
        ...

    def pause(self) -> None:
        """Kick every vCPU out of guest mode and hold it until :meth:`resume`."""
        ...

    def resume(self) -> None: ...

    def stop(self) -> None:
        """Kick and join every vCPU thread.  Idempotent."""
        ...

    def reset(self) -> None:
        """Return all vCPUs and in-accelerator devices to power-on state (threads stopped)."""
        ...

    def cpu_dump(self, index: int = 0) -> str:
        """A QEMU-style register dump of one vCPU (for errors and 'info registers')."""
        ...

    def vcpu_thread_ids(self) -> list[int | None]:
        """The host thread id of each vCPU's thread (None before it starts), for query-cpus-fast."""
        ...


__all__ = ["Accelerator", "CpuConfig", "MachineContext"]
