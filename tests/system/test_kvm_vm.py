"""VM- and vCPU-level KVM bindings: state round trips, clock, irqchip/PIT state, eventfds, routing."""

from __future__ import annotations

import os
import time

import pytest
from test_kvm_util import assemble

from pyvmm.accel.kvm_vcpu import VcpuRunner, install_kick_handler
from pyvmm.bus import Bus
from pyvmm.errors import KvmError
from pyvmm.kvm import abi
from pyvmm.kvm.ioctls import ExitReason, MpState
from pyvmm.kvm.system import System
from pyvmm.kvm.vm import IrqchipRoute, MsiRoute, Vm
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl
from support.recording import RecordingDevice

ORG = 0x1000


@pytest.fixture
def kvm():
    s = System()
    yield s
    s.close()


@pytest.fixture
def vm(kvm: System):
    v = kvm.create_vm()
    v.set_identity_map_addr(0xFFFBC000)
    v.set_tss_addr(0xFFFBD000)
    v.create_irqchip()
    v.create_pit2()
    yield v
    v.close()


def test_vcpu_state_round_trips(vm: Vm, kvm: System) -> None:
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(kvm.supported_cpuid())
    regs = vcpu.get_regs()
    regs.rax, regs.r15, regs.rip, regs.rflags = 0x1122334455667788, 42, 0x1234, 0x202
    vcpu.set_regs(regs)
    back = vcpu.get_regs()
    assert (back.rax, back.r15, back.rip, back.rflags) == (0x1122334455667788, 42, 0x1234, 0x202)

    sregs = vcpu.get_sregs()
    assert sregs.apic_base & 0xFFFFF000 == 0xFEE00000 and sregs.apic_base & (1 << 8)  # BSP, enabled
    sregs.cs.selector, sregs.cs.base = 0x1000, 0x10000
    vcpu.set_sregs(sregs)
    assert (vcpu.get_sregs().cs.selector, vcpu.get_sregs().cs.base) == (0x1000, 0x10000)

    vcpu.set_fpu(abi.KvmFpu(fcw=0x37E, mxcsr=0x1F80))
    assert vcpu.get_fpu().fcw == 0x37E
    # MXCSR read back through the XSAVE image (legacy area offset 24; some kernels report 0 in
    # KVM_GET_FPU's mxcsr).
    assert int.from_bytes(bytes(vcpu.get_xsave())[24:28], "little") == 0x1F80

    assert vcpu.set_msrs({0x1A0: 1, 0x174: 0x10}) == 2  # MISC_ENABLE fast strings, SYSENTER_CS
    msrs = vcpu.get_msrs([0x1A0, 0x174])
    assert msrs[0x174] == 0x10 and msrs[0x1A0] & 1

    assert vcpu.get_mp_state() == MpState.RUNNABLE
    assert vcpu.apic_id() == 0
    vcpu.setup_lint()
    lapic = vcpu.get_lapic()
    lvt0 = int.from_bytes(bytes(lapic.regs[0x350:0x354]), "little")
    lvt1 = int.from_bytes(bytes(lapic.regs[0x360:0x364]), "little")
    assert (lvt0 >> 8) & 7 == 7 and (lvt1 >> 8) & 7 == 4

    ev = vcpu.get_events()
    vcpu.set_events(ev)
    xs = vcpu.get_xsave()
    vcpu.set_xsave(xs)

    ap = vm.create_vcpu(1)
    assert ap.get_mp_state() == MpState.UNINITIALIZED  # non-boot vCPU with an in-kernel LAPIC
    assert ap.apic_id() == 1


def test_clock_and_in_kernel_device_state(vm: Vm) -> None:
    c1 = vm.get_clock().clock
    time.sleep(0.01)
    c2 = vm.get_clock().clock
    assert c2 > c1
    vm.set_clock(10**12)
    assert 10**12 <= vm.get_clock().clock < 10**12 + 10**9

    for chip_id in (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE, abi.KVM_IRQCHIP_IOAPIC):
        chip = vm.get_irqchip(chip_id)
        assert chip.chip_id == chip_id
        vm.set_irqchip(chip)
    pit = vm.get_pit2()
    vm.set_pit2(pit)
    vm.set_gsi_routing(Vm.default_pc_routes() + [MsiRoute(24, 0xFEE00000, 0x30)])
    vm.irq_line(4, True)
    vm.irq_line(4, False)
    assert vm.signal_msi(0xFEE00000, 0x30) == 0  # no vCPU yet: nobody to deliver to


def test_default_routes_shape() -> None:
    routes = Vm.default_pc_routes()
    assert IrqchipRoute(0, abi.KVM_IRQCHIP_PIC_MASTER, 0) in routes
    assert IrqchipRoute(9, abi.KVM_IRQCHIP_PIC_SLAVE, 1) in routes
    assert IrqchipRoute(23, abi.KVM_IRQCHIP_IOAPIC, 23) in routes
    assert len(routes) == 16 * 2 + 8


def test_ioeventfd_write_completes_in_kernel(kvm: System) -> None:
    """A port write matched by an ioeventfd signals the eventfd and never reaches the bus."""
    install_kick_handler()
    code = assemble("""
        mov dx, 0x520
        mov al, 7
        out dx, al
        mov dx, 0x510
        out dx, al
        hlt
    """, ORG)
    mem = GuestMemory(1 << 20)
    mem.write(ORG, code)
    vm = kvm.create_vm()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.map_memory(mem)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(kvm.supported_cpuid())
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = ORG, 2
        vcpu.set_regs(regs)
        sregs = vcpu.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
            seg.selector, seg.base = 0, 0
        vcpu.set_sregs(sregs)
        vm.ioeventfd(efd, 0x520, 1, pio=True)
        io = Bus("io")
        dev = RecordingDevice()
        io.register(0x510, 0x20, dev, "all")
        r = VcpuRunner(vcpu, io, Bus("mmio"), VmControl(), halt_action="stop")
        r.run()
        assert r.last_exit == ExitReason.HLT
        assert dev.writes == [(0, 1, 7)]          # only the 0x510 write exited
        assert os.eventfd_read(efd) == 1
        vm.ioeventfd(efd, 0x520, 1, pio=True, deassign=True)
        with pytest.raises(KvmError):
            vm.ioeventfd(efd, 0x520, 3, pio=True)
    finally:
        os.close(efd)
        vm.close()
        mem.close()


def test_irqfd_assign_and_deassign(vm: Vm) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.irqfd(efd, 5)
        os.eventfd_write(efd, 1)  # injects GSI 5 (edge)
        vm.irqfd(efd, 5, deassign=True)
    finally:
        os.close(efd)
