"""Unit tests of the 8259 pair and the 8254 PIT models (no CPU involved)."""

from __future__ import annotations

from pyvmm.devices.pic import PicPair
from pyvmm.devices.pit import PIT_HZ, Pit

NS = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


class FakeScheduler:
    """Collects timers; ``advance`` moves the clock and fires what is due, in order."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.timers: list[list] = []

    def schedule(self, deadline_ns, callback):
        t = [deadline_ns, callback, False]
        self.timers.append(t)
        return t

    def cancel(self, token) -> None:
        token[2] = True

    def advance(self, ns: int) -> None:
        end = self.clock.now + ns
        while True:
            due = sorted((t for t in self.timers if not t[2] and t[0] <= end), key=lambda t: t[0])
            if not due:
                break
            t = due[0]
            t[2] = True
            self.clock.now = max(self.clock.now, t[0])
            t[1]()
        self.clock.now = end


def init_pics(p: PicPair, master_base=0x20, slave_base=0x28, auto_eoi=False) -> None:
    m, s = p.chip_device(True), p.chip_device(False)
    icw4 = 0x03 if auto_eoi else 0x01
    m.io_write(0, 1, 0x11)
    m.io_write(1, 1, master_base)
    m.io_write(1, 1, 0x04)
    m.io_write(1, 1, icw4)
    s.io_write(0, 1, 0x11)
    s.io_write(1, 1, slave_base)
    s.io_write(1, 1, 0x02)
    s.io_write(1, 1, icw4)
    m.io_write(1, 1, 0x00)
    s.io_write(1, 1, 0x00)


def test_pic_reset_state_is_masked_firmware_layout() -> None:
    outputs = []
    p = PicPair(outputs.append)
    p.set_irq(0, True)
    assert not p.output                          # everything masked after power-on
    assert p.chip_device(True).io_read(1, 1) == 0xFF


def test_pic_edge_priority_eoi_and_cascade() -> None:
    outputs = []
    p = PicPair(outputs.append)
    init_pics(p)
    p.set_irq(3, True)
    p.set_irq(1, True)
    p.set_irq(12, True)                          # slave IRQ4 via cascade on master IRQ2
    assert p.output
    assert p.intack() == 0x21                    # IRQ1 highest
    assert not p.output                          # IRQ2/3 wait while IRQ1 is in service
    assert p.intack() == 0x27                    # an INTA now gets the spurious IRQ7 vector
    m, s = p.chip_device(True), p.chip_device(False)
    m.io_write(0, 1, 0x20)                       # non-specific EOI: clears IRQ1
    assert p.intack() == 0x2C                    # the cascade beats IRQ3: slave vector 0x28+4
    assert p.master.isr == 0b100 and p.slave.isr == 0b10000
    s.io_write(0, 1, 0x20)                       # EOI slave, then master
    m.io_write(0, 1, 0x20)
    assert p.intack() == 0x23
    m.io_write(0, 1, 0x63)                       # specific EOI for IRQ3
    assert p.master.isr == 0 and not p.output
    # edge-triggered: holding the line high does not request again
    p.set_irq(1, True)
    assert not p.output
    p.set_irq(1, False)
    p.set_irq(1, True)
    assert p.intack() == 0x21


def test_pic_level_triggered_via_elcr_and_mask() -> None:
    p = PicPair(lambda level: None)
    init_pics(p)
    elcr = p.elcr_device()
    elcr.io_write(1, 1, 0x08)                    # IRQ11 level
    assert elcr.io_read(1, 1) == 0x08
    elcr.io_write(0, 1, 0x07)                    # IRQ0-2 can never be level
    assert elcr.io_read(0, 1) == 0x00
    p.set_irq(11, True)
    assert p.intack() == 0x2B
    p.chip_device(False).io_write(0, 1, 0x20)
    p.chip_device(True).io_write(0, 1, 0x20)
    assert p.output                              # still asserted: level re-requests
    p.set_irq(11, False)
    assert not p.output
    p.chip_device(False).io_write(1, 1, 0x08)    # mask IRQ11
    p.set_irq(11, True)
    assert not p.output


def test_pic_poll_mode_and_register_reads() -> None:
    p = PicPair(lambda level: None)
    init_pics(p)
    m = p.chip_device(True)
    p.set_irq(5, True)
    m.io_write(0, 1, 0x0A)                       # OCW3: read IRR
    assert m.io_read(0, 1) & 0x20
    m.io_write(0, 1, 0x0C)                       # poll
    assert m.io_read(0, 1) == 0x85
    m.io_write(0, 1, 0x0B)                       # read ISR
    assert m.io_read(0, 1) == 0x20


def test_pic_auto_eoi() -> None:
    p = PicPair(lambda level: None)
    init_pics(p, auto_eoi=True)
    p.set_irq(4, True)
    assert p.intack() == 0x24
    assert p.master.isr == 0


def _pit(clock: FakeClock):
    sched = FakeScheduler(clock)
    edges = []
    level = [False]

    def irq0(v: bool) -> None:
        if v and not level[0]:
            edges.append(clock.now)
        level[0] = v

    return Pit(irq0, sched, clock=clock), sched, edges


def test_pit_mode2_periodic_irq_and_counter() -> None:
    clock = FakeClock()
    pit, sched, edges = _pit(clock)
    pit.io_write(3, 1, 0x34)                     # ch0, lo/hi, mode 2
    pit.io_write(0, 1, 0xA9)
    pit.io_write(0, 1, 0x04)                     # 1193 ticks ~ 1 ms
    start = clock.now
    sched.advance(10 * 1_000_000 + 500_000)
    assert len(edges) == 10
    period = edges[1] - edges[0]
    assert abs(period - 1193 * NS // PIT_HZ) <= 1
    assert edges[0] - start == -(-1193 * NS // PIT_HZ)
    # latch and read back the counter: counts down from 1193
    pit.io_write(3, 1, 0x00)
    lo = pit.io_read(0, 1)
    hi = pit.io_read(0, 1)
    assert 0 < (hi << 8 | lo) <= 1193


def test_pit_mode0_one_shot_and_readback_status() -> None:
    clock = FakeClock()
    pit, sched, edges = _pit(clock)
    pit.io_write(3, 1, 0x30)                     # ch0, lo/hi, mode 0
    pit.io_write(0, 1, 0xFF)
    pit.io_write(0, 1, 0xFF)                     # 65535 ticks ~ 55 ms
    sched.advance(50 * 1_000_000)
    assert edges == []
    pit.io_write(3, 1, 0xE2)                     # read-back status of ch0
    assert pit.io_read(0, 1) & 0x80 == 0         # OUT still low
    sched.advance(10 * 1_000_000)
    assert len(edges) == 1
    sched.advance(100 * 1_000_000)
    assert len(edges) == 1                       # one shot only
    pit.io_write(3, 1, 0xE2)
    assert pit.io_read(0, 1) & 0x80              # OUT high after terminal count


def test_pit_channel2_gate_and_port61_out() -> None:
    """Linux's PIT calibration: mode 0 on channel 2, gate via port 0x61, poll OUT2 (bit 5)."""
    clock = FakeClock()
    pit, sched, _ = _pit(clock)
    p61 = pit.speaker_device()
    p61.io_write(0, 1, (p61.io_read(0, 1) & ~0x02) | 0x01)   # gate high, speaker off
    pit.io_write(3, 1, 0xB0)                     # ch2, lo/hi, mode 0
    pit.io_write(2, 1, 0x9B)
    pit.io_write(2, 1, 0x2E)                     # 11931 ticks = 10 ms
    assert not p61.io_read(0, 1) & 0x20
    clock.now += 9 * 1_000_000
    assert not p61.io_read(0, 1) & 0x20
    clock.now += 2 * 1_000_000
    assert p61.io_read(0, 1) & 0x20
    assert p61.io_read(0, 1) & 0x01              # gate reads back


def test_pit_reprogramming_cancels_the_old_timer() -> None:
    clock = FakeClock()
    pit, sched, edges = _pit(clock)
    pit.io_write(3, 1, 0x34)
    pit.io_write(0, 1, 0xA9)
    pit.io_write(0, 1, 0x04)
    pit.io_write(3, 1, 0x30)                     # switch to mode 0, no count yet
    sched.advance(5 * 1_000_000)
    assert edges == []


def test_pit_short_mode0_count_fires_even_if_the_clock_moves_during_the_load() -> None:
    """Linux's PIT clockevent programs one-shots down to 0xF ticks (~13 us); a clock read after the
    load that already sees the count expired must not drop the interrupt (lost wakeup)."""
    class TickingClock(FakeClock):
        def __call__(self) -> int:               # every read costs 20 us of host time
            self.now += 20_000
            return self.now

    clock = TickingClock()
    pit, sched, edges = _pit(clock)
    pit.io_write(3, 1, 0x30)                     # ch0, lo/hi, mode 0
    pit.io_write(0, 1, 0x0F)
    pit.io_write(0, 1, 0x00)                     # 15 ticks ~ 12.6 us
    sched.advance(1_000_000)
    assert len(edges) == 1
