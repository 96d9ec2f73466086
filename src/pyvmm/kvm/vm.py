"""A KVM virtual machine file descriptor: memory slots, in-kernel irqchip/PIT, interrupts, clock."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.ioctls import Ioctl
from pyvmm.kvm.syscall import ioctl, ioctl_errno
from pyvmm.memory import GuestMemory

if TYPE_CHECKING:
    from pyvmm.kvm.system import System
    from pyvmm.kvm.vcpu import Vcpu

log = logging.getLogger(__name__)

PAGE_SIZE = 4096


@dataclass(frozen=True)
class MemorySlot:
    slot: int
    gpa: int
    size: int
    host_addr: int
    flags: int = 0


@dataclass(frozen=True)
class IrqchipRoute:
    """A GSI routed to a pin of an in-kernel interrupt controller."""

    gsi: int
    chip: int  # abi.KVM_IRQCHIP_PIC_MASTER / _SLAVE / _IOAPIC
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """A GSI that, when raised (e.g. via an irqfd), delivers an MSI."""

    gsi: int
    address: int
    data: int


class Vm:
    """One VM fd.  Created by :meth:`pyvmm.kvm.system.System.create_vm`."""

    def __init__(self, system: System, fd: int) -> None:
        self.system = system
        self.fd = fd
        self.slots: list[MemorySlot] = []
        self.has_irqchip = False
        self.has_pit = False
        self.vcpus: list[Vcpu] = []
        self._irq_level = abi.KvmIrqLevel()

    # -- capabilities ---------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some capabilities depend on the VM type)."""
        ret, _ = ioctl_errno(self.fd, Ioctl.CHECK_EXTENSION, int(cap))
        return max(ret, 0)

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = abi.KvmEnableCap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, Ioctl.ENABLE_CAP, ec)

    # -- platform set-up (before vCPUs are created) ----------------------------------------------
    def set_tss_addr(self, addr: int) -> None:
        """Three pages of guest-physical space KVM on Intel needs for real-mode emulation."""
        ioctl(self.fd, Ioctl.SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """One page for the EPT identity map (Intel without unrestricted guest)."""
        ioctl(self.fd, Ioctl.SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """In-kernel PIC pair, IOAPIC and (for vCPUs created afterwards) local APICs."""
        ioctl(self.fd, Ioctl.CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self, flags: int = abi.KVM_PIT_SPEAKER_DUMMY) -> None:
        """In-kernel i8254.  ``KVM_PIT_SPEAKER_DUMMY`` also puts port 0x61 in the kernel."""
        ioctl(self.fd, Ioctl.CREATE_PIT2, abi.KvmPitConfig(flags=flags))
        self.has_pit = True

    # -- memory -----------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = abi.KvmUserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa,
                                              memory_size=size, userspace_addr=host_addr)
        ioctl(self.fd, Ioctl.SET_USER_MEMORY_REGION, region)
        self.slots = [s for s in self.slots if s.slot != slot]
        if size:
            self.slots.append(MemorySlot(slot, gpa, size, host_addr, flags))

    def map_memory(self, memory: GuestMemory, flags: int = 0) -> list[MemorySlot]:
        """One slot per guest RAM region (slot numbers follow region order)."""
        for i, r in enumerate(memory.regions):
            self.set_user_memory_region(i, r.gpa, r.size, r.host_addr, flags)
        return list(self.slots)

    def set_slot_flags(self, slot: int, flags: int) -> None:
        """Change the flags of an existing slot (e.g. KVM_MEM_LOG_DIRTY_PAGES on or off)."""
        for s in self.slots:
            if s.slot == slot:
                if s.flags != flags:
                    self.set_user_memory_region(slot, s.gpa, s.size, s.host_addr, flags)
                return
        raise KvmError(f"no memory slot {slot}")

    def get_dirty_log(self, slot: int) -> bytearray:
        """KVM_GET_DIRTY_LOG: the slot's bitmap (bit i = page i, LSB first), which KVM then clears.

        The slot must have KVM_MEM_LOG_DIRTY_PAGES.  The bitmap is rounded up to whole 64-bit words,
        as the kernel writes it.
        """
        for s in self.slots:
            if s.slot == slot:
                break
        else:
            raise KvmError(f"no memory slot {slot}")
        pages = s.size // PAGE_SIZE
        buf = (ctypes.c_uint64 * ((pages + 63) // 64))()
        ioctl(self.fd, Ioctl.GET_DIRTY_LOG, abi.KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(buf)))
        return bytearray(buf)

    # -- interrupts --------------------------------------------------------------------------------
    def irq_line(self, gsi: int, level: bool) -> None:
        """KVM_IRQ_LINE: set the level of an in-kernel irqchip input.  Thread-safe in the kernel."""
        lvl = abi.KvmIrqLevel(irq=gsi, level=1 if level else 0)
        ioctl(self.fd, Ioctl.IRQ_LINE, lvl)

    def signal_msi(self, address: int, data: int) -> int:
        """Inject one MSI; returns >0 if delivered, 0 if not (blocked by the guest or no destination).

        KVM reports "no destination APIC" as -1, which libc turns into EPERM; that is a guest
        configuration state, not a host failure, so it is not raised.
        """
        msi = abi.KvmMsi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        ret, err = ioctl_errno(self.fd, Ioctl.SIGNAL_MSI, msi)
        if ret >= 0:
            return ret
        if err == errno.EPERM:
            return 0
        raise KvmError(f"KVM ioctl KVM_SIGNAL_MSI failed: {os.strerror(err)} (errno {err})")

    def set_gsi_routing(self, routes: list[IrqchipRoute | MsiRoute]) -> None:
        """Replace the whole GSI routing table."""
        table = abi.kvm_irq_routing_type(max(len(routes), 1))()
        table.nr = len(routes)
        for i, r in enumerate(routes):
            e = table.entries[i]
            e.gsi = r.gsi
            if isinstance(r, IrqchipRoute):
                e.type = abi.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = r.chip
                e.u.irqchip.pin = r.pin
            else:
                e.type = abi.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r.address & 0xFFFFFFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
        ioctl(self.fd, Ioctl.SET_GSI_ROUTING, table)

    @staticmethod
    def default_pc_routes() -> list[IrqchipRoute]:
        """KVM's default x86 table: GSI 0-15 to both PICs and the IOAPIC, 16-23 to the IOAPIC only."""
        routes: list[IrqchipRoute] = []
        for gsi in range(24):
            if gsi < 16:
                chip = abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else abi.KVM_IRQCHIP_PIC_SLAVE
                routes.append(IrqchipRoute(gsi, chip, gsi % 8))
            routes.append(IrqchipRoute(gsi, abi.KVM_IRQCHIP_IOAPIC, gsi))
        return routes

    @staticmethod
    def pc_routes() -> list[IrqchipRoute]:
        """The PC wiring: ISA IRQ 0 (the PIT) reaches IOAPIC pin 2, as MP tables and ACPI say.

        GSI 0 goes to PIC pin 0 and IOAPIC pin 2; GSI 2 (the PIC cascade) is not routed; every other
        ISA GSI goes to its PIC pin and the same IOAPIC pin; GSIs 16-23 to the IOAPIC only.
        """
        routes: list[IrqchipRoute] = []
        for gsi in range(24):
            if gsi == 2:
                continue
            if gsi < 16:
                chip = abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else abi.KVM_IRQCHIP_PIC_SLAVE
                routes.append(IrqchipRoute(gsi, chip, gsi % 8))
            routes.append(IrqchipRoute(gsi, abi.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
        return routes

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        """Wire an eventfd so that writing it raises ``gsi`` without a trip through userspace."""
        req = abi.KvmIrqfd(fd=fd, gsi=gsi)
        if deassign:
            req.flags |= abi.KVM_IRQFD_FLAG_DEASSIGN
        if resample_fd is not None:
            req.flags |= abi.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = resample_fd
        ioctl(self.fd, Ioctl.IRQFD, req)

    def ioeventfd(self, fd: int, addr: int, length: int, pio: bool, datamatch: int | None = None,
                  deassign: bool = False) -> None:
        """Make a guest write to ``addr`` signal an eventfd instead of exiting to userspace."""
        if length not in (0, 1, 2, 4, 8):
            raise KvmError(f"ioeventfd length {length} is not 0/1/2/4/8")
        req = abi.KvmIoeventfd(addr=addr, len=length, fd=fd)
        if pio:
            req.flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            req.flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
            req.datamatch = datamatch
        if deassign:
            req.flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        ioctl(self.fd, Ioctl.IOEVENTFD, req)

    def get_irqchip(self, chip_id: int) -> abi.KvmIrqchip:
        chip = abi.KvmIrqchip(chip_id=chip_id)
        ioctl(self.fd, Ioctl.GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: abi.KvmIrqchip) -> None:
        ioctl(self.fd, Ioctl.SET_IRQCHIP, chip)

    def get_pit2(self) -> abi.KvmPitState2:
        st = abi.KvmPitState2()
        ioctl(self.fd, Ioctl.GET_PIT2, st)
        return st

    def set_pit2(self, st: abi.KvmPitState2) -> None:
        ioctl(self.fd, Ioctl.SET_PIT2, st)

    # -- clock -----------------------------------------------------------------------------------
    def get_clock(self) -> abi.KvmClockData:
        data = abi.KvmClockData()
        ioctl(self.fd, Ioctl.GET_CLOCK, data)
        return data

    def set_clock(self, clock_ns: int, flags: int = 0, realtime: int = 0) -> None:
        ioctl(self.fd, Ioctl.SET_CLOCK, abi.KvmClockData(clock=clock_ns, flags=flags, realtime=realtime))

    # -- vCPUs -----------------------------------------------------------------------------------
    def create_vcpu(self, index: int) -> Vcpu:
        """Create vCPU ``index`` (also its APIC id) and map its ``kvm_run`` area."""
        from pyvmm.kvm.vcpu import Vcpu

        fd = ioctl(self.fd, Ioctl.CREATE_VCPU, index)
        try:
            vcpu = Vcpu(self, index, fd, self.system.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close every vCPU and the VM fd.  The kernel frees the VM once all fds and mappings are gone."""
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
