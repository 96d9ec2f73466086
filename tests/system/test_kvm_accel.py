"""KvmAccelerator through the Accelerator protocol on the real /dev/kvm.

Covers the life cycle (setup, boot state, start, pause/resume, cpu_dump,
stop, reset), SMP bring-up through the in-kernel LAPIC (INIT/SIPI sent by the
guest), and interrupt delivery through the in-kernel PIC from the IRQ sink.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from test_kvm_util import assemble, buses

from pyvmm.accel.base import CpuConfig, MachineContext
from pyvmm.accel.kvm import IDENTITY_MAP_ADDR, TSS_ADDR, KvmAccelerator
from pyvmm.cpu_state import CR0_ET, CR0_NE, CR0_PE, CpuState, Segment
from pyvmm.errors import ConfigError, KvmError
from pyvmm.kvm.ioctls import MpState
from pyvmm.memory import GuestMemory
from pyvmm.runstate import RequestKind, VmControl
from pyvmm.x86 import cpuid
from support.recording import RecordingDevice, drain
from support.waiting import wait_until

ORG = 0x1000
PORT = 0x510


class Machine:
    """Just enough of a machine to drive the accelerator: RAM, buses, one recording port."""

    def __init__(self, ncpus: int = 1, cpu: str = "host") -> None:
        self.mem = GuestMemory(2 << 20)
        self.io_bus, self.mmio_bus = buses()
        self.control = VmControl()
        self.port = RecordingDevice()
        self.io_bus.register(PORT, 4, self.port, "test-port")
        self.ctx = MachineContext(self.mem, self.io_bus, self.mmio_bus, self.control, ncpus, CpuConfig.parse(cpu))
        self.acc = KvmAccelerator()

    def values(self) -> list[int]:
        return [v for _, _, v in self.port.writes]


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine()
    yield m
    m.acc.close()
    m.mem.close()


@pytest.fixture
def smp_machine() -> Iterator[Machine]:
    m = Machine(ncpus=2)
    yield m
    m.acc.close()
    m.mem.close()


def flat32_state(rip: int) -> CpuState:
    data = Segment.flat32(0x10, code=False)
    return CpuState(regs={"rip": rip}, cs=Segment.flat32(0x08, code=True), ds=data, es=data, ss=data,
                    fs=data, gs=data, cr0=CR0_PE | CR0_ET | CR0_NE)


SPIN_GUEST = f"""
    mov dx, {PORT}
    mov al, 1
    out dx, al
1:  jmp 1b
"""


def test_lifecycle_run_pause_dump_resume_stop(machine: Machine) -> None:
    machine.mem.write(ORG, assemble(SPIN_GUEST, ORG))
    sink = machine.acc.setup(machine.ctx)
    assert hasattr(sink, "set_irq")
    # The TSS / identity-map pages sit above RAM and below 4 GiB.
    assert not machine.mem.contains(IDENTITY_MAP_ADDR) and not machine.mem.contains(TSS_ADDR)
    machine.acc.set_boot_state(CpuState(regs={"rip": ORG, "rbx": 0x1234}), start_aps=False)
    machine.acc.start()
    assert wait_until(lambda: machine.values() == [1])
    running_dump = machine.acc.cpu_dump(0)  # while the guest spins inside KVM_RUN
    assert "RBX=0000000000001234" in running_dump
    machine.acc.pause()
    assert all(r.parked for r in machine.acc.runners)
    dump = machine.acc.cpu_dump(0)
    lines = dump.splitlines()
    assert lines[0] == "CPU#0"
    assert lines[1].startswith("RAX=") and "RBX=0000000000001234" in lines[1]
    assert any(line.startswith("RIP=") and "CPL=0" in line for line in lines)
    assert any(line.startswith("CS =0000 0000000000000000 0000ffff") for line in lines)
    for prefix in ("ES =", "SS =", "DS =", "FS =", "GS =", "LDT=", "TR =", "GDT=", "IDT=", "CR0=", "EFER="):
        assert any(line.startswith(prefix) for line in lines), prefix
    machine.acc.resume()
    assert wait_until(lambda: not any(r.parked for r in machine.acc.runners))
    machine.acc.stop()
    machine.acc.stop()  # idempotent
    assert all(not (r.thread and r.thread.is_alive()) for r in machine.acc.runners)
    assert drain(machine.control) == []


def test_pause_before_start_holds_vcpus(machine: Machine) -> None:
    machine.mem.write(ORG, assemble(SPIN_GUEST, ORG))
    machine.acc.setup(machine.ctx)
    machine.acc.set_boot_state(CpuState(regs={"rip": ORG}), start_aps=False)
    machine.acc.pause()
    machine.acc.start()
    assert wait_until(lambda: all(r.parked for r in machine.acc.runners))
    time.sleep(0.05)
    assert machine.values() == []
    machine.acc.resume()
    assert wait_until(lambda: machine.values() == [1])


def test_reset_recreates_the_vm_and_keeps_the_irq_sink(machine: Machine) -> None:
    machine.mem.write(ORG, assemble(SPIN_GUEST, ORG))
    sink = machine.acc.setup(machine.ctx)
    machine.acc.set_boot_state(CpuState(regs={"rip": ORG}), start_aps=False)
    machine.acc.start()
    assert wait_until(lambda: machine.values() == [1])
    old_vm_fd = machine.acc.vm.fd
    machine.acc.reset()
    assert machine.acc.vm.fd >= 0
    machine.acc.set_boot_state(CpuState(regs={"rip": ORG}), start_aps=False)
    machine.acc.start()
    assert wait_until(lambda: machine.values() == [1, 1])
    sink.set_irq(4, True)  # goes to the new VM
    sink.set_irq(4, False)
    machine.acc.stop()
    assert old_vm_fd >= 0


KICK_PORT = 0x5F0
KICK_GUEST = f"""
    mov dx, {KICK_PORT}
    mov al, 7
    out dx, al
    mov dx, {PORT}
    mov al, 1
    out dx, al
1:  jmp 1b
"""


def _eventfd_count(fd: int) -> int:
    """The count an eventfd holds (and reset it); 0 when nothing signalled it."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_ioeventfd_capability_survives_reset(machine: Machine) -> None:
    """Registered once through the capability, an ioeventfd is made again on the VM a reset builds."""
    machine.mem.write(ORG, assemble(KICK_GUEST, ORG))
    machine.acc.setup(machine.ctx)
    caps = machine.acc.capabilities()
    assert caps.ioeventfd is not None and caps.irqfd is not None and caps.msi is not None
    assert caps.dma_written == machine.mem.dirty.mark  # DMA marks pages for dirty tracking
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        caps.ioeventfd.register_ioeventfd(fd, KICK_PORT, 1, pio=True)
        for round_ in (1, 2):
            machine.acc.set_boot_state(CpuState(regs={"rip": ORG}), start_aps=False)
            machine.acc.start()
            assert wait_until(lambda n=round_: len(machine.values()) == n)
            assert _eventfd_count(fd) == 1, f"round {round_}: the guest's OUT did not signal the ioeventfd"
            machine.acc.reset()
        caps.ioeventfd.unregister_ioeventfd(fd, KICK_PORT, 1, pio=True)
        assert machine.acc.fast_paths.registered == (0, 0)
    finally:
        os.close(fd)


def test_device_request_stops_the_vcpu_at_once(smp_machine: Machine) -> None:
    """After a device posts a reset request from an OUT, not one more guest instruction runs."""
    m = smp_machine
    m.mem.write(ORG, assemble(f"""
        mov dx, {PORT}
        mov al, 1
        out dx, al          # the device posts a reset request here
        mov al, 2
        out dx, al
    1:  jmp 1b
    """, ORG))
    m.port.on_write = lambda off, size, value: value == 1 and m.control.request_reset("device asked")
    m.acc.setup(m.ctx)
    m.acc.set_boot_state(CpuState(regs={"rip": ORG}), start_aps=False)
    m.acc.start()
    req = m.control.wait(5)
    assert req is not None and req.kind == RequestKind.RESET and req.reason == "device asked"
    time.sleep(0.1)
    assert m.values() == [1]
    m.acc.pause()  # the held vCPU counts as parked; the AP is parked by the kick
    assert "RIP=" in m.acc.cpu_dump(0)
    # A machine that answers a request by pausing (-action panic=pause) lets the vCPU run on
    # at the next resume, as QEMU's 'cont' does; otherwise only stop()/reset() release it.
    m.acc.resume()
    assert wait_until(lambda: m.values() == [1, 2])
    m.acc.reset()
    m.acc.set_boot_state(CpuState(regs={"rip": ORG}), start_aps=False)
    m.port.on_write = None
    m.acc.start()
    assert wait_until(lambda: m.values() == [1, 2, 1, 2])
    m.acc.stop()


def test_triple_fault_posts_reset_request(machine: Machine) -> None:
    machine.mem.write(ORG, assemble("""
        lidt [idtr]
        ud2
    idtr: .word 0
          .long 0
    """, ORG, bits=32))
    machine.acc.setup(machine.ctx)
    machine.acc.set_boot_state(flat32_state(ORG), start_aps=False)
    machine.acc.start()
    req = machine.control.wait(10)
    assert req is not None and req.kind == RequestKind.RESET and req.reason == "triple fault"


def test_smp_bsp_starts_ap_with_init_sipi(smp_machine: Machine) -> None:
    m = smp_machine
    # BSP (32-bit flat): INIT then SIPI (vector 2 -> AP starts at 0x2000 in real mode) via the xAPIC ICR.
    m.mem.write(ORG, assemble(f"""
        mov dword ptr [0xfee00310], 0x01000000
        mov dword ptr [0xfee00300], 0x00004500
        mov dword ptr [0xfee00310], 0x01000000
        mov dword ptr [0xfee00300], 0x00004602
        mov eax, dword ptr [0xfee00020]       # own LAPIC id register
        shr eax, 24
        add al, 0xb0
        mov dx, {PORT}
        out dx, al
    1:  jmp 1b
    """, ORG, bits=32))
    # AP: report its initial APIC id from CPUID.1:EBX[31:24], then halt.
    m.mem.write(0x2000, assemble(f"""
        mov eax, 1
        cpuid
        shr ebx, 24
        mov al, bl
        add al, 0xa0
        mov dx, {PORT}
        out dx, al
    1:  cli
        hlt
        jmp 1b
    """, 0x2000))
    m.acc.setup(m.ctx)
    m.acc.set_boot_state(flat32_state(ORG), start_aps=False)
    assert m.acc.mp_state(1) == MpState.UNINITIALIZED
    m.acc.start()
    assert wait_until(lambda: len(m.values()) >= 2, 10), f"got {m.values()}"
    assert sorted(m.values()) == [0xA1, 0xB0]  # AP has APIC id 1, BSP reads id 0 from its LAPIC
    assert wait_until(lambda: m.acc.mp_state(1) == MpState.HALTED)
    assert "CS =0200 0000000000002000" in m.acc.cpu_dump(1)
    m.acc.pause()
    m.acc.resume()
    m.acc.stop()
    assert drain(m.control) == []


def test_start_aps_runs_every_vcpu_from_the_boot_state(smp_machine: Machine) -> None:
    m = smp_machine
    m.mem.write(ORG, assemble(f"""
        mov eax, 1
        cpuid
        shr ebx, 24
        mov al, bl
        mov dx, {PORT}
        out dx, al
    1:  cli
        hlt
        jmp 1b
    """, ORG))
    m.acc.setup(m.ctx)
    m.acc.set_boot_state(CpuState(regs={"rip": ORG}), start_aps=True)
    m.acc.start()
    assert wait_until(lambda: sorted(m.values()) == [0, 1]), f"got {m.values()}"
    m.acc.stop()


def test_pic_interrupt_from_sink_reaches_guest(machine: Machine) -> None:
    # Real mode: program the in-kernel PIC (vectors 0x20..), unmask IRQ 4, sti; hlt.  The handler
    # writes 0x44 to the test port.  This goes through LINT0 = ExtINT set up by the accelerator.
    machine.mem.write(ORG, assemble(f"""
        cli
        xor ax, ax
        mov ds, ax
        mov ss, ax
        mov sp, 0x7000
        mov word ptr [0x24 * 4], offset handler
        mov word ptr [0x24 * 4 + 2], 0
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x04
        out 0x21, al
        mov al, 0x01
        out 0x21, al
        mov al, 0xef
        out 0x21, al
        mov dx, {PORT}
        mov al, 1
        out dx, al
        sti
    1:  hlt
        jmp 1b
    handler:
        mov dx, {PORT}
        mov al, 0x44
        out dx, al
        mov al, 0x20
        out 0x20, al
        iret
    """, ORG))
    sink = machine.acc.setup(machine.ctx)
    machine.acc.set_boot_state(CpuState(regs={"rip": ORG}), start_aps=False)
    machine.acc.start()
    assert wait_until(lambda: machine.values() == [1])
    time.sleep(0.05)  # let it reach hlt
    sink.set_irq(4, True)
    sink.set_irq(4, False)
    assert wait_until(lambda: machine.values() == [1, 0x44]), f"got {machine.values()}"
    sink.set_irq(4, True)
    sink.set_irq(4, False)
    assert wait_until(lambda: machine.values() == [1, 0x44, 0x44]), f"got {machine.values()}"
    machine.acc.stop()


def test_cpu_feature_edits_and_topology_reach_kvm(smp_machine: Machine) -> None:
    m = smp_machine
    m.ctx.cpu = CpuConfig.parse("host,-cx16,-xsave,+hypervisor")
    m.acc.setup(m.ctx)
    for index, table in enumerate(m.acc.cpuid_tables):
        leaf1 = cpuid.find(table, 1)
        assert leaf1 is not None
        assert not leaf1.ecx & (1 << 13)       # cx16
        assert not leaf1.ecx & (1 << 26)       # xsave
        assert not leaf1.ecx & (1 << 28)       # avx depends on xsave
        assert leaf1.ecx & (1 << 31)           # hypervisor
        assert leaf1.ebx >> 24 == index        # initial APIC id
        assert [e.edx for e in table if e.function == 0xB] == [index] * 3
    # What KVM holds for the vCPU.  (Some hosts add feature bits they cannot hide from the guest,
    # so only bits KVM lets userspace control are compared.)
    for index in range(2):
        entries = m.acc.runners[index].vcpu.get_cpuid()
        leaf1 = next(e for e in entries if e.function == 1)
        assert not leaf1.ecx & (1 << 13)
        assert leaf1.ecx & (1 << 31)
        assert leaf1.ebx >> 24 == index
        sig = next(e for e in entries if e.function == 0x40000000)
        assert b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx)) == b"KVMKVMKVM\0\0\0"
        topo = sorted((e.index, e.eax, e.ebx, e.ecx & 0xFFFF, e.edx) for e in entries if e.function == 0xB)
        assert topo == [(0, 0, 1, 0x100, index), (1, 1, 2, 0x201, index), (2, 0, 0, 2, index)]


def test_unknown_feature_and_model_are_config_errors() -> None:
    for spec in ("host,+no-such-feature", "qemu64"):
        m = Machine(cpu=spec)
        try:
            with pytest.raises(ConfigError):
                m.acc.setup(m.ctx)
            assert m.acc.system is None  # nothing leaked
        finally:
            m.mem.close()


def test_missing_kvm_device_is_kvm_error() -> None:
    m = Machine()
    m.acc = KvmAccelerator(device="/nonexistent/kvm")
    try:
        with pytest.raises(KvmError, match="/nonexistent/kvm"):
            m.acc.setup(m.ctx)
    finally:
        m.mem.close()
