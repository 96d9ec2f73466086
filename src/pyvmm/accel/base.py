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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


#: One value in a state dict: the accelerator's state is plain data the stream can carry.
StateValue = int | bytes


@runtime_checkable
class AcceleratorState(Protocol):
    """What an accelerator offers snapshots and live migration (kvm: :mod:`pyvmm.accel.kvm_state`).

    States are dicts of str keys to ints and bytes, with a ``"version"`` key; a load refuses, with
    one clear :class:`~pyvmm.errors.PyvmmError` line and before changing anything, a state it
    cannot load exactly.  Save and load vCPU state only while the vCPUs are paused or not yet
    started.  Restore order: RAM, :meth:`load_platform_state`, then :meth:`load_cpu_state` for
    each vCPU, then start.  Device interrupt lines are not part of the platform state: a device
    whose line was high raises it again after its own load.

    Dirty bitmaps have one bit per 4 KiB page of ``memory.regions[region]``: bit ``i`` is bit
    ``i % 8`` of byte ``i // 8``, the length rounded up to 64-bit words.  They include pages
    device DMA wrote (the accelerator's ``dma_written`` capability marks them).
    """

    def save_cpu_state(self, index: int) -> dict[str, StateValue]: ...

    def load_cpu_state(self, index: int, state: Mapping[str, object]) -> None: ...

    def save_platform_state(self) -> dict[str, StateValue]:
        """In-accelerator devices and clocks (kvm: PIC, IOAPIC, PIT, KVM clock)."""
        ...

    def load_platform_state(self, state: Mapping[str, object]) -> None: ...

    def start_dirty_log(self) -> None:
        """Track guest and DMA writes to RAM from now on; callable while the vCPUs run."""
        ...

    def get_and_clear_dirty(self, region: int) -> bytearray:
        """The pages of RAM region ``region`` written since the last call (or start_dirty_log)."""
        ...

    def stop_dirty_log(self) -> None: ...


__all__ = ["Accelerator", "AcceleratorState", "CpuConfig", "MachineContext", "StateValue"]
