"""Unit tests of the local APIC, I/O APIC and the userspace irqchip that wires them (no CPU)."""

from __future__ import annotations

from test_pic_pit import FakeClock, FakeScheduler

from pyvmm.bus import Bus
from pyvmm.devices.ioapic import IoApic
from pyvmm.devices.irqchip import UserspaceIrqchip
from pyvmm.devices.lapic import Lapic, Reg

BUS_HZ = 25_000_000


def make_lapic(clock=None, sched=None):
    events = {"change": 0, "eoi": [], "ipi": []}
    clock = clock or FakeClock()
    sched = sched or FakeScheduler(clock)

    def change():
        events["change"] += 1

    la = Lapic(0, BUS_HZ, sched, on_change=change, eoi_broadcast=events["eoi"].append,
               send_ipi=lambda src, lo, hi: events["ipi"].append((lo, hi)), clock=clock)
    la.write_reg(Reg.SVR, 0x1FF)
    return la, events, clock, sched


def test_lapic_priority_tpr_isr_and_eoi() -> None:
    la, ev, _, _ = make_lapic()
    la.accept(0x31)
    la.accept(0x52)
    assert la.highest_deliverable() == 0x52
    assert la.ack() == 0x52
    assert la.highest_deliverable() == -1            # 0x31 is below the in-service class
    assert la.read_reg(Reg.PPR) == 0x50
    la.write_reg(Reg.EOI, 0)
    assert la.highest_deliverable() == 0x31
    la.write_reg(Reg.TPR, 0x40)                       # TPR above 0x31's class masks it
    assert la.highest_deliverable() == -1
    la.write_reg(Reg.TPR, 0)
    assert la.ack() == 0x31
    assert la.read_reg(Reg.ISR0 + 0x10) == 1 << 0x11  # ISR bit 0x31 in the second ISR word
    la.write_reg(Reg.EOI, 0)
    assert ev["eoi"] == []                            # edge vectors: no EOI broadcast


def test_lapic_level_vector_broadcasts_eoi_and_sw_disable_masks_lvts() -> None:
    la, ev, _, _ = make_lapic()
    la.accept(0x61, level=True)
    assert la.read_reg(Reg.TMR0 + 0x30) == 1 << 1
    assert la.ack() == 0x61
    la.write_reg(Reg.EOI, 0)
    assert ev["eoi"] == [0x61]
    la.write_reg(Reg.LVT_TIMER, 0x40)
    la.write_reg(Reg.SVR, 0xFF)                       # software disable
    assert la.read_reg(Reg.LVT_TIMER) & (1 << 16)
    la.accept(0x70)
    assert la.highest_deliverable() == -1


def test_lapic_timer_oneshot_periodic_and_divider() -> None:
    la, _, clock, sched = make_lapic()
    la.write_reg(Reg.TDCR, 0x3)                       # divide by 16
    la.write_reg(Reg.LVT_TIMER, 0x40)                 # one-shot
    la.write_reg(Reg.TMICT, 25_000)                   # 25000 * 16 / 25 MHz = 16 ms
    sched.advance(8_000_000)
    assert 12_000 <= la.read_reg(Reg.TMCCT) <= 13_000
    assert la.irr == 0
    sched.advance(9_000_000)
    assert la.irr == 1 << 0x40 and la.read_reg(Reg.TMCCT) == 0
    la.ack()
    la.write_reg(Reg.EOI, 0)
    sched.advance(50_000_000)
    assert la.irr == 0                                # one-shot fired once
    la.write_reg(Reg.TDCR, 0xB)                       # divide by 1
    la.write_reg(Reg.LVT_TIMER, 0x40 | (1 << 17))     # periodic
    la.write_reg(Reg.TMICT, 25_000)                   # 1 ms
    fired = la.timer_fired
    for _ in range(5):
        sched.advance(1_000_000)
        assert la.ack() == 0x40
        la.write_reg(Reg.EOI, 0)
    assert la.timer_fired - fired == 5
    la.write_reg(Reg.TMICT, 0)                        # writing 0 stops the timer
    sched.advance(10_000_000)
    assert la.irr == 0


def test_lapic_icr_and_registers() -> None:
    la, ev, _, _ = make_lapic()
    assert la.read_reg(Reg.VERSION) & 0xFF == 0x14
    assert la.read_reg(Reg.ID) == 0
    la.write_reg(Reg.ICR_HI, 0x01000000)
    la.write_reg(Reg.ICR_LO, 0x000040F3)
    assert ev["ipi"] == [(0x40F3, 0x01000000)]
    assert la.read_reg(Reg.ICR_LO) & (1 << 12) == 0   # delivery status idle
    assert la.io_read(Reg.SVR + 1, 1) == 0x01         # byte access inside a register


def deliveries():
    out = []
    return out, lambda vec, mode, dest, logical, level: out.append((vec, mode, dest, logical, level))


def test_ioapic_registers_edge_and_level_with_remote_irr() -> None:
    out, deliver = deliveries()
    io = IoApic(1, deliver)
    io.io_write(0, 4, 0x01)
    assert io.io_read(0x10, 4) == 0x00170011          # 24 pins, version 0x11
    io.io_write(0, 4, 0x00)
    assert io.io_read(0x10, 4) == 1 << 24             # ID
    # pin 4: edge, vector 0x34, physical dest 0
    io.write_reg(0x18, 0x34)
    io.set_irq(4, True)
    io.set_irq(4, True)
    io.set_irq(4, False)
    io.set_irq(4, True)
    assert out == [(0x34, 0, 0, False, False)] * 2
    # pin 9: level, masked first
    io.write_reg(0x10 + 18, 0x39 | (1 << 15) | (1 << 16))
    io.set_irq(9, True)
    assert len(out) == 2
    io.write_reg(0x10 + 18, 0x39 | (1 << 15))         # unmask while asserted: delivers
    assert out[-1] == (0x39, 0, 0, False, True)
    assert io.read_reg(0x10 + 18) & (1 << 14)         # remote IRR
    io.set_irq(9, True)
    assert len(out) == 3                              # no redelivery until EOI
    io.eoi(0x39)
    assert len(out) == 4                              # still asserted: delivered again
    io.set_irq(9, False)
    io.eoi(0x39)
    assert len(out) == 4 and not io.read_reg(0x10 + 18) & (1 << 14)
    io.write_reg(0x10 + 18, 0x39 | (1 << 15) | (1 << 14))   # remote IRR is read-only
    assert not io.read_reg(0x10 + 18) & (1 << 14)


class Cpu:
    def __init__(self) -> None:
        self.intr = False
        self.changes = 0

    def set_intr(self, level: bool) -> None:
        self.intr = level
        self.changes += 1


def test_irqchip_routes_gsis_and_acks_through_lapic_and_pic() -> None:
    chip = UserspaceIrqchip(1, BUS_HZ)
    io, mmio = Bus("io"), Bus("mmio")
    chip.register(io, mmio)
    cpu = Cpu()
    chip.attach_cpu(0, cpu)
    # The PIC path: LINT0 is ExtINT after reset; program the 8259 to vectors 0x20..
    for port, val in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xEF)):
        io.write(port, 1, val)                       # only IRQ4 unmasked
    chip.set_irq(4, True)
    assert cpu.intr
    assert chip.ack(0) == 0x24
    assert not cpu.intr
    io.write(0x20, 1, 0x20)
    chip.set_irq(4, False)
    # The IOAPIC path: GSI 0 (PIT) lands on pin 2; GSI 2 goes nowhere
    mmio.write(0xFEE000F0, 4, 0x1FF)                  # software-enable the LAPIC
    mmio.write(0xFEC00000, 4, 0x14)
    mmio.write(0xFEC00010, 4, 0x30)
    chip.set_irq(2, True)
    assert not cpu.intr
    chip.set_irq(0, True)
    assert cpu.intr
    assert chip.ack(0) == 0x30
    mmio.write(0xFEE000B0, 4, 0)                      # LAPIC EOI through MMIO
    assert mmio.read(0xFEE00020, 4) == 0              # APIC ID of CPU 0
    assert chip.ack(0) == -1
    # the PIT registered on the io bus drives GSI 0 as well
    assert io.read(0x61, 1) & 0x10 in (0, 0x10)


def test_irqchip_self_ipi_and_masked_lint0() -> None:
    chip = UserspaceIrqchip(1, BUS_HZ)
    io, mmio = Bus("io"), Bus("mmio")
    chip.register(io, mmio)
    cpu = Cpu()
    chip.attach_cpu(0, cpu)
    mmio.write(0xFEE000F0, 4, 0x1FF)
    mmio.write(0xFEE00300, 4, 0x00040055)             # self IPI, vector 0x55
    assert cpu.intr and chip.ack(0) == 0x55
    mmio.write(0xFEE000B0, 4, 0)
    mmio.write(0xFEE00350, 4, 0x10700)                # mask LINT0: the 8259 no longer reaches the CPU
    for port, val in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0x00)):
        io.write(port, 1, val)
    chip.set_irq(1, True)
    assert not cpu.intr


def test_lapic_tsc_deadline_mode() -> None:
    la, _, clock, sched = make_lapic()
    la.write_reg(Reg.LVT_TIMER, 0x45 | (2 << 17))
    la.set_tsc_deadline(clock.now + 5_000_000)
    sched.advance(4_000_000)
    assert la.irr == 0 and la.read_reg(Reg.TMCCT) == 0
    sched.advance(2_000_000)
    assert la.irr == 1 << 0x45
    la.ack()
    la.write_reg(Reg.EOI, 0)
    la.set_tsc_deadline(clock.now + 1_000_000)
    la.set_tsc_deadline(None)                        # writing 0 disarms
    sched.advance(5_000_000)
    assert la.irr == 0


def test_lapic_short_oneshot_fires_even_if_the_clock_moves_during_the_write() -> None:
    """A one-shot shorter than the host time between two clock reads must still fire.

    Linux programs deltas of a few bus ticks; the TMICT write used to read the clock twice
    and drop the timer as "already expired" -> the idle guest never woke (lost wakeup).
    """
    class TickingClock(FakeClock):
        def __call__(self) -> int:             # every read costs 1 us of host time
            self.now += 1_000
            return self.now

    clock = TickingClock()
    la, _, clock, sched = make_lapic(clock=clock)
    la.write_reg(Reg.TDCR, 0xB)                       # divide by 1
    la.write_reg(Reg.LVT_TIMER, 0x40)                 # one-shot
    la.write_reg(Reg.TMICT, 5)                        # 5 ticks at 25 MHz = 200 ns
    sched.advance(1_000_000)
    assert la.irr == 1 << 0x40 and la.timer_fired == 1


class ApPort:
    """A vCPU as the APIC bus sees it: INIT, SIPI, NMI and INTR recorded."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def set_intr(self, level: bool) -> None:
        pass

    def raise_nmi(self) -> None:
        self.events.append("nmi")

    def init_ipi(self) -> None:
        self.events.append("init")

    def startup_ipi(self, vector: int) -> None:
        self.events.append(f"sipi {vector:#x}")


def test_irqchip_with_sparse_apic_ids_routes_ipis_by_id_to_the_right_vcpu() -> None:
    """-smp 4,sockets=2,cores=3,maxcpus=6: vCPUs 0-3 have APIC ids 0, 1, 2, 4."""
    chip = UserspaceIrqchip(4, BUS_HZ, apic_ids=[0, 1, 2, 4], ioapic_id=7)
    io, mmio = Bus("io"), Bus("mmio")
    chip.register(io, mmio)
    ports = [ApPort() for _ in range(4)]
    for i, p in enumerate(ports):
        chip.attach_cpu(i, p)
    chip.bind_current_cpu(3)
    assert mmio.read(0xFEE00020, 4) == 4 << 24          # vCPU 3 reads APIC id 4
    chip.bind_current_cpu(0)
    mmio.write(0xFEE00310, 4, 4 << 24)                  # ICR high: destination APIC id 4
    mmio.write(0xFEE00300, 4, 0x4500)                   # INIT
    mmio.write(0xFEE00300, 4, 0x4608)                   # SIPI, vector 8
    mmio.write(0xFEE00300, 4, 0x4400)                   # NMI
    assert ports[3].events == ["init", "sipi 0x8", "nmi"]
    assert ports[1].events == ports[2].events == []
    mmio.write(0xFEE00310, 4, 3 << 24)                  # APIC id 3: nobody
    mmio.write(0xFEE00300, 4, 0x4400)
    assert all(p.events[-1:] != ["nmi"] for p in ports[:3]) and len(ports[3].events) == 3
    mmio.write(0xFEC00000, 4, 0)                        # I/O APIC id register
    assert mmio.read(0xFEC00010, 4) >> 24 == 7
