"""The ``kvm`` accelerator: vCPUs, interrupt controllers and timers in the host kernel.

Set-up builds a PC the way QEMU's ``-machine accel=kvm,kernel-irqchip=on``
does: in-kernel PIC pair + IOAPIC + per-vCPU LAPIC, an in-kernel i8254 (with
port 0x61), guest RAM as memory slots, and one vCPU per ``ncpus`` whose CPUID
comes from :mod:`pyvmm.x86.cpuid`.  Devices get interrupts through an
:class:`KvmIrqSink` (KVM_IRQ_LINE); everything else is port I/O and MMIO
exits, which :class:`~pyvmm.accel.kvm_vcpu.VcpuRunner` sends to the buses.

Reset throws the VM away and builds a fresh one: the kernel has no "reset
VM" operation, and recreating it is the simplest way to get every in-kernel
device back to power-on state.  The IRQ sink and the fast paths
(:class:`KvmFastPaths`: ioeventfds, irqfds) survive it: they follow the current
VM, and the fast paths register again on the new VM whatever devices had
registered, so devices never learn that the VM was replaced.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from pyvmm.accel.base import MachineContext
from pyvmm.accel.kvm_state import KvmMigration
from pyvmm.accel.kvm_vcpu import VcpuRunner, install_kick_handler
from pyvmm.capabilities import AccelCapabilities
from pyvmm.config import CpuConfig
from pyvmm.cpu_state import CpuState
from pyvmm.errors import AccelError, ConfigError, KvmError, PyvmmError
from pyvmm.kvm import abi, fastrun
from pyvmm.kvm.dump import apply_cpu_state
from pyvmm.kvm.ioctls import Cap, MpState
from pyvmm.kvm.system import DEFAULT_DEVICE, System
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import MsiRoute, Vm
from pyvmm.x86 import cpuid, layout

log = logging.getLogger(__name__)
T = TypeVar("T")

#: One page for the EPT identity map and three for the real-mode TSS (see :mod:`pyvmm.x86.layout`).
IDENTITY_MAP_ADDR = layout.KVM_IDENTITY_MAP_ADDR
TSS_ADDR = layout.KVM_TSS_ADDR
#: MSI routes for irqfds (vhost-user calls) take GSIs from here up, above the IOAPIC's 24 pins.
MSI_GSI_BASE = 24

# MSRs loaded into every vCPU at boot (values as a PC firmware would leave them).
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

BOOT_MSRS: dict[int, int] = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
}

FPU_CONTROL_WORD = 0x37F
MXCSR_DEFAULT = 0x1F80

CPU_MODELS = ("host", "max")


def to_neutral(entries: list[abi.KvmCpuidEntry2]) -> list[cpuid.CpuidEntry]:
    return [cpuid.CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in entries]


def to_kvm(entries: list[cpuid.CpuidEntry]) -> list[abi.KvmCpuidEntry2]:
    return [abi.KvmCpuidEntry2(function=e.function, index=e.index, flags=e.flags, eax=e.eax, ebx=e.ebx,
                               ecx=e.ecx, edx=e.edx) for e in entries]


def build_base_cpuid(system: System, cfg: CpuConfig) -> list[cpuid.CpuidEntry]:
    """The CPUID table shared by all vCPUs: KVM's supported set, KVM leaves, ``--cpu`` edits."""
    if cfg.model not in CPU_MODELS:
        raise ConfigError(f"--cpu {cfg.model}: the kvm accelerator supports the models {', '.join(CPU_MODELS)}")
    table = to_neutral(system.supported_cpuid())
    if system.check_extension(Cap.TSC_DEADLINE_TIMER):
        # KVM emulates the TSC-deadline timer in its LAPIC but does not list it as supported CPUID.
        leaf1 = cpuid.find(table, 1)
        if leaf1 is not None:
            leaf1.set_bit("ecx", 24, True)
    table = cpuid.add_hypervisor_leaves(table)
    return cpuid.apply_feature_edits(table, cfg.enable, cfg.disable, supported=table)


class KvmIrqSink:
    """The :class:`~pyvmm.irq.InterruptSink` for devices: KVM_IRQ_LINE on whichever VM is current.

    The lock keeps a level change from racing a reset that swaps the VM;
    changes arriving while no VM exists are dropped (reset lowers all lines).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vm: Vm | None = None

    def attach(self, vm: Vm | None) -> None:
        with self._lock:
            self._vm = vm

    def set_irq(self, gsi: int, level: bool) -> None:
        with self._lock:
            vm = self._vm
            if vm is not None:
                vm.irq_line(gsi, level)

    def signal_msi(self, address: int, data: int) -> None:
        with self._lock:
            if self._vm is not None:
                self._vm.signal_msi(address, data)


class KvmFastPaths:
    """KVM_IOEVENTFD and KVM_IRQFD on whichever VM is current: the ioeventfd and irqfd capabilities.

    Devices register once; a registration is kept and made again on each new VM
    (reset replaces the VM).  A registration the kernel refuses raises
    :class:`~pyvmm.errors.KvmError` and is not kept, so the device can fall back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vm: Vm | None = None
        self._ioeventfds: dict[tuple[int, int, int, bool, int | None], None] = {}
        self._irqfds: dict[tuple[int, int], int | None] = {}
        self._msi_irqfds: dict[int, MsiRoute] = {}  # eventfd -> its MSI route (GSIs above the PC's 24)

    def attach(self, vm: Vm | None) -> None:
        """Follow ``vm`` (None: no VM) and register on it everything registered so far."""
        with self._lock:
            self._vm = vm
            if vm is None:
                return
            for fd, addr, length, pio, datamatch in self._ioeventfds:
                vm.ioeventfd(fd, addr, length, pio, datamatch)
            for (fd, gsi), resample_fd in self._irqfds.items():
                vm.irqfd(fd, gsi, resample_fd=resample_fd)
            if self._msi_irqfds:
                vm.set_gsi_routing([*vm.pc_routes(), *self._msi_irqfds.values()])
                for fd, route in self._msi_irqfds.items():
                    vm.irqfd(fd, route.gsi)

    def register_ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool,
                           datamatch: int | None = None) -> None:
        with self._lock:
            if self._vm is not None:
                self._vm.ioeventfd(fd, addr, length, pio, datamatch)
            self._ioeventfds[(fd, addr, length, pio, datamatch)] = None

    def unregister_ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool,
                             datamatch: int | None = None) -> None:
        with self._lock:
            key = (fd, addr, length, pio, datamatch)
            if key not in self._ioeventfds:
                return
            del self._ioeventfds[key]
            if self._vm is not None:
                self._vm.ioeventfd(fd, addr, length, pio, datamatch, deassign=True)

    def register_irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None) -> None:
        with self._lock:
            if self._vm is not None:
                self._vm.irqfd(fd, gsi, resample_fd=resample_fd)
            self._irqfds[(fd, gsi)] = resample_fd

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        with self._lock:
            if (fd, gsi) not in self._irqfds:
                return
            del self._irqfds[(fd, gsi)]
            if self._vm is not None:
                self._vm.irqfd(fd, gsi, deassign=True)

    def register_msi_irqfd(self, fd: int, address: int, data: int) -> None:
        with self._lock:
            old = self._msi_irqfds.get(fd)
            if old is not None and (old.address, old.data) == (address, data):
                return
            used = {r.gsi for r in self._msi_irqfds.values()}
            gsi = old.gsi if old is not None else next(g for g in range(MSI_GSI_BASE, MSI_GSI_BASE + 4096)
                                                       if g not in used)
            routes = dict(self._msi_irqfds)
            routes[fd] = MsiRoute(gsi, address, data)
            if self._vm is not None:
                self._vm.set_gsi_routing([*self._vm.pc_routes(), *routes.values()])
                if old is None:
                    try:
                        self._vm.irqfd(fd, gsi)
                    except PyvmmError:
                        self._vm.set_gsi_routing([*self._vm.pc_routes(), *self._msi_irqfds.values()])
                        raise
            self._msi_irqfds = routes

    def unregister_msi_irqfd(self, fd: int) -> None:
        with self._lock:
            route = self._msi_irqfds.pop(fd, None)
            if route is None or self._vm is None:
                return
            self._vm.irqfd(fd, route.gsi, deassign=True)
            self._vm.set_gsi_routing([*self._vm.pc_routes(), *self._msi_irqfds.values()])

    @property
    def registered(self) -> tuple[int, int]:
        """(ioeventfds, irqfds) currently registered."""
        with self._lock:
            return len(self._ioeventfds), len(self._irqfds)


class KvmAccelerator(KvmMigration):
    """The Accelerator protocol (see :mod:`pyvmm.accel.base`) on top of /dev/kvm.

    State save/load and dirty logging (:class:`~pyvmm.accel.base.AcceleratorState`) come from
    :class:`~pyvmm.accel.kvm_state.KvmMigration`.
    """

    name = "kvm"

    def __init__(self, device: str = DEFAULT_DEVICE) -> None:
        self.device = device
        self.system: System | None = None
        self.vm: Vm | None = None
        self.runners: list[VcpuRunner] = []
        self.sink = KvmIrqSink()
        self.fast_paths = KvmFastPaths()
        self._ctx: MachineContext | None = None
        self._base_cpuid: list[cpuid.CpuidEntry] = []
        #: The CPUID table given to each vCPU (KVM_SET_CPUID2), for inspection.
        self.cpuid_tables: list[list[cpuid.CpuidEntry]] = []
        self._started = False
        self._paused = False

    # -- life cycle ---------------------------------------------------------------------------------
    def setup(self, ctx: MachineContext) -> KvmIrqSink:
        if ctx.ncpus < 1:
            raise ConfigError(f"-smp {ctx.ncpus}: at least one vCPU is needed")
        install_kick_handler()
        self.system = System(self.device)
        fastrun.run_call()  # build/load the KVM_RUN helper now, not on a vCPU thread
        try:
            max_vcpus = self.system.check_extension(Cap.MAX_VCPUS) or self.system.check_extension(Cap.NR_VCPUS)
            if max_vcpus and ctx.ncpus > max_vcpus:
                raise ConfigError(f"-smp {ctx.ncpus}: KVM on this host allows at most {max_vcpus} vCPUs")
            if ctx.ncpus > 255:
                raise ConfigError(f"-smp {ctx.ncpus}: at most 255 vCPUs (xAPIC ids) are supported")
            self._ctx = ctx
            self._base_cpuid = build_base_cpuid(self.system, ctx.cpu)
            self._build_vm()
        except BaseException:
            self._teardown_vm()
            self.system.close()
            self.system = None
            raise
        return self.sink

    def _build_vm(self) -> None:
        ctx = self._ctx
        assert ctx is not None and self.system is not None
        vm = self.system.create_vm()
        self.vm = vm
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.set_tss_addr(TSS_ADDR)
        vm.create_irqchip()
        vm.set_gsi_routing(vm.pc_routes())  # PIT on IOAPIC pin 2, as the MP table and MADT say
        vm.create_pit2()
        vm.map_memory(ctx.memory, self._slot_flags())
        self._state_features = None
        self.runners = []
        self.cpuid_tables = []
        topo = ctx.topo
        for apic_id in topo.apic_ids:
            vcpu = vm.create_vcpu(apic_id)  # KVM's vCPU id is its initial (x2)APIC id
            table = cpuid.for_vcpu(self._base_cpuid, apic_id, topo)
            vcpu.set_cpuid(to_kvm(table))
            self.cpuid_tables.append(table)
            vcpu.setup_lint()
            self._load_msrs(vcpu)
            self.runners.append(VcpuRunner(vcpu, ctx.io_bus, ctx.mmio_bus, ctx.control))
        self.sink.attach(vm)
        self.fast_paths.attach(vm)

    def _teardown_vm(self) -> None:
        self.sink.attach(None)
        self.fast_paths.attach(None)
        for r in self.runners:
            r.vcpu.close()
        self.runners = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None

    def capabilities(self) -> AccelCapabilities:
        """ioeventfd, irqfd, MSI (and MSI irqfds) in the kernel; the DMA observer marks pages for dirty tracking."""
        dma = self._ctx.memory.dirty.mark if self._ctx is not None else None
        return AccelCapabilities(ioeventfd=self.fast_paths, irqfd=self.fast_paths, msi=self.sink.signal_msi,
                                 dma_written=dma, msi_irqfd=self.fast_paths)

    def set_boot_state(self, boot_cpu: CpuState, start_aps: bool) -> None:
        """Load the BSP (and with ``start_aps`` every AP) with ``boot_cpu``; other APs wait for INIT/SIPI."""
        if self._started:
            raise AccelError("kvm: set_boot_state() needs the vCPUs stopped")
        if not self.runners:
            raise AccelError("kvm: set_boot_state() before setup()")
        for r in self.runners:
            if r.index == 0 or start_aps:
                self._load_state(r.vcpu, boot_cpu)
                if r.index != 0:
                    r.vcpu.set_mp_state(MpState.RUNNABLE)
            # Without start_aps, APs stay in KVM_MP_STATE_UNINITIALIZED (KVM's default for a
            # non-boot vCPU with an in-kernel LAPIC) until the guest sends INIT + SIPI.

    def _load_state(self, vcpu: Vcpu, state: CpuState) -> None:
        regs = abi.KvmRegs()
        sregs = vcpu.get_sregs()  # keeps apic_base and the pending-interrupt bitmap
        apply_cpu_state(state, regs, sregs)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        fpu = abi.KvmFpu()
        fpu.fcw = FPU_CONTROL_WORD
        fpu.mxcsr = MXCSR_DEFAULT
        vcpu.set_fpu(fpu)
        self._load_msrs(vcpu)

    @staticmethod
    def _load_msrs(vcpu: Vcpu) -> None:
        # One at a time: KVM stops at the first MSR it refuses, and some hosts lack some of these.
        for index, value in BOOT_MSRS.items():
            if vcpu.set_msrs({index: value}) != 1:
                log.debug("vCPU %d: KVM refused MSR %#x = %#x", vcpu.index, index, value)

    def start(self) -> None:
        if not self.runners:
            raise AccelError("kvm: start() before setup()")
        if self._started:
            return
        self._started = True
        for r in self.runners:
            if self._paused:
                r.request_pause()
            r.start()

    def pause(self) -> None:
        """Kick every vCPU and return once all of them are parked (or have ended)."""
        self._paused = True
        for r in self.runners:
            r.request_pause()
        for r in self.runners:
            if not r.wait_parked():
                raise AccelError(f"kvm: vCPU {r.index} did not pause")

    def resume(self) -> None:
        self._paused = False
        for r in self.runners:
            r.resume()

    def stop(self) -> None:
        for r in self.runners:
            r.request_stop()
        for r in self.runners:
            r.join()
        self._started = False
        self._paused = False
        for r in self.runners:
            r.resume()  # clears the pause request for the next start()

    def reset(self) -> None:
        """Stop the vCPUs and replace the VM with a fresh one (needs set_boot_state() before start())."""
        self.stop()
        self._teardown_vm()
        self._build_vm()

    def close(self) -> None:
        """Stop and release every kernel object (the accelerator cannot be used afterwards)."""
        self.stop()
        self._teardown_vm()
        if self.system is not None:
            self.system.close()
            self.system = None

    # -- introspection ------------------------------------------------------------------------------
    @property
    def ncpus(self) -> int:
        return len(self.runners)

    def vcpu_thread_ids(self) -> list[int | None]:
        return [getattr(getattr(r, "thread", None), "native_id", None) for r in self.runners]

    def cpu_dump(self, index: int = 0) -> str:
        """QEMU-style register dump of vCPU ``index``; safe while running, paused or stopped."""
        if not 0 <= index < len(self.runners):
            raise AccelError(f"no vCPU {index} (this machine has {len(self.runners)})")
        r = self.runners[index]
        try:
            return r.call(r.dump_state)
        except (KvmError, AccelError) as e:
            return f"CPU#{index}: registers unavailable: {e}"

    def run_on_vcpu(self, index: int, fn: Callable[[Vcpu], T]) -> T:
        """Run ``fn(vcpu)`` where vCPU ioctls are safe (its thread, or here while it is not running)."""
        r = self.runners[index]
        return r.call(lambda: fn(r.vcpu))

    def mp_state(self, index: int) -> MpState:
        return MpState(self.run_on_vcpu(index, lambda v: v.get_mp_state()))
