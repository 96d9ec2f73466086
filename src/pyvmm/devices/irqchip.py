"""The userspace irqchip: 8259 pair + 8254 PIT + I/O APIC + one local APIC per vCPU.

Accelerators without in-kernel interrupt controllers (tcg) create this and
hand it to the machine as the :class:`~pyvmm.irq.InterruptSink` that device
interrupt lines drive.  Routing follows QEMU/KVM's PC wiring: GSI 0 (the
PIT) goes to 8259 IRQ0 and I/O APIC pin 2, GSI 2 is the cascade and goes
nowhere, other GSIs below 16 go to both the 8259 IRQ of the same number and
the I/O APIC pin of the same number, and GSIs 16-23 only to the I/O APIC.

The CPU side is a :class:`CpuPort` per vCPU: the irqchip tells it when its
INTR line changes, and the vCPU acknowledges with :meth:`ack` when it takes
an interrupt.  One re-entrant lock covers all models; timers fire from one
thread (:class:`TimerQueue`) driven by host monotonic time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

from pyvmm.bus import Bus
from pyvmm.devices.ioapic import IoApic
from pyvmm.devices.lapic import DeliveryMode, Lapic
from pyvmm.devices.pic import PicPair
from pyvmm.devices.pit import Pit
from pyvmm.irq import CpuPort
from pyvmm.x86 import layout

log = logging.getLogger(__name__)

ICR_LEVEL_ASSERT = 1 << 14      # ICR level bit: 0 with level trigger = INIT de-assert
ICR_TRIGGER_LEVEL = 1 << 15


class _Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: int, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False


class TimerQueue:
    """Runs callbacks at host monotonic deadlines on one thread, under the irqchip lock."""

    def __init__(self, lock: threading.RLock, name: str = "irqchip-timers") -> None:
        self._lock = lock
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int, _Timer]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._quit = False
        self._name = name

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> _Timer:
        t = _Timer(deadline_ns, callback)
        with self._cond:
            heapq.heappush(self._heap, (deadline_ns, next(self._seq), t))
            if self._heap[0][2] is t:
                self._cond.notify()
        return t

    def cancel(self, token: object) -> None:
        if isinstance(token, _Timer):
            token.cancelled = True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._quit = False
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._quit = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def clear(self) -> None:
        with self._cond:
            for _, _, t in self._heap:
                t.cancelled = True
            self._heap.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._quit:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic_ns()
                    if delay <= 0:
                        break
                    self._cond.wait(delay / 1e9)
                if self._quit:
                    return
                _, _, t = heapq.heappop(self._heap)
            with self._lock:
                if not t.cancelled:
                    try:
                        t.callback()
                    except Exception:  # a device bug must not kill the clock
                        log.exception("timer callback failed")


class _Locked:
    """A bus device wrapper that takes the irqchip lock around every access."""

    __slots__ = ("_dev", "_lock")

    def __init__(self, dev, lock: threading.RLock) -> None:
        self._dev = dev
        self._lock = lock

    def io_read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._dev.io_read(offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._dev.io_write(offset, size, value)


class _LapicWindow:
    """The 0xfee00000 page: each vCPU thread sees its own local APIC."""

    def __init__(self, chip: UserspaceIrqchip) -> None:
        self._chip = chip

    def io_read(self, offset: int, size: int) -> int:
        with self._chip.lock:
            return self._chip.current_lapic().io_read(offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self._chip.lock:
            self._chip.current_lapic().io_write(offset, size, value)


class UserspaceIrqchip:
    """PIC pair, PIT, I/O APIC and LAPICs behind one lock: the devices' InterruptSink, the
    software vCPUs' :class:`~pyvmm.irq.CpuInterruptController`, and the machine's MSI sink."""

    def __init__(self, ncpus: int, lapic_bus_hz: int, *, apic_ids: Sequence[int] | None = None,
                 ioapic_id: int | None = None) -> None:
        """``apic_ids`` are the LAPIC ids of vCPUs 0.. ``ncpus``-1 (default: their indexes);
        the I/O APIC's id defaults to the first id after them."""
        if not 1 <= ncpus <= 255:
            raise ValueError(f"ncpus {ncpus} out of range")
        ids = list(range(ncpus)) if apic_ids is None else list(apic_ids)
        if len(ids) != ncpus or len(set(ids)) != ncpus or ids[0] != 0 or not all(0 <= a < 0xFF for a in ids):
            raise ValueError(f"APIC ids {ids} for {ncpus} CPUs: need distinct ids below 255, the BSP's 0")
        self._index_of = {a: i for i, a in enumerate(ids)}
        self.lock = threading.RLock()
        self.timers = TimerQueue(self.lock)
        self._tls = threading.local()
        self.cpus: list[CpuPort | None] = [None] * ncpus
        self._intr = [False] * ncpus
        self.pic = PicPair(self._pic_output)
        self.ioapic = IoApic(max(ids) + 1 if ioapic_id is None else ioapic_id, self._ioapic_deliver)
        self.lapics = [Lapic(ids[i], lapic_bus_hz, self.timers, on_change=self._make_update(i),
                             eoi_broadcast=self._eoi_broadcast, send_ipi=self._send_ipi)
                       for i in range(ncpus)]
        self.apic_global_enable = [True] * ncpus
        self.counters = {"nmi": 0, "init": 0, "sipi": 0, "msi": 0, "msi_dropped": 0}
        self.pit = Pit(lambda level: self.set_irq(0, level), self.timers)

    # -- wiring --------------------------------------------------------------------------------
    def register(self, io_bus: Bus, mmio_bus: Bus) -> None:
        """Put the models on the machine's buses."""
        lk = self.lock
        io_bus.register(layout.PIC_MASTER_PORT, 2, _Locked(self.pic.chip_device(True), lk), "pic-master")
        io_bus.register(layout.PIC_SLAVE_PORT, 2, _Locked(self.pic.chip_device(False), lk), "pic-slave")
        io_bus.register(layout.PIC_ELCR_PORT, 2, _Locked(self.pic.elcr_device(), lk), "elcr")
        io_bus.register(layout.PIT_PORT, 4, _Locked(self.pit, lk), "pit")
        io_bus.register(layout.SPEAKER_PORT, 1, _Locked(self.pit.speaker_device(), lk), "port61")
        mmio_bus.register(layout.IOAPIC_ADDR, layout.IOAPIC_SIZE, _Locked(self.ioapic, lk), "ioapic")
        mmio_bus.register(layout.LAPIC_ADDR, layout.LAPIC_SIZE, _LapicWindow(self), "lapic")

    def attach_cpu(self, index: int, port: CpuPort) -> None:
        with self.lock:
            self.cpus[index] = port
            self._intr[index] = False
            self._update(index)

    def bind_current_cpu(self, index: int) -> None:
        """Called on each vCPU thread so LAPIC MMIO reaches that CPU's APIC."""
        self._tls.index = index

    def current_lapic(self) -> Lapic:
        return self.lapics[getattr(self._tls, "index", 0)]

    def start(self) -> None:
        self.timers.start()

    def stop(self) -> None:
        self.timers.stop()

    def reset(self) -> None:
        with self.lock:
            self.timers.clear()
            self.pic.reset()
            self.pit.reset()
            self.ioapic.reset()
            for lapic in self.lapics:
                lapic.reset()
            self.apic_global_enable = [True] * len(self.lapics)
            for i in range(len(self.cpus)):
                self._update(i)

    # -- InterruptSink -------------------------------------------------------------------------
    def set_irq(self, gsi: int, level: bool) -> None:
        with self.lock:
            if gsi == 0:
                self.pic.set_irq(0, level)
                self.ioapic.set_irq(2, level)
            elif gsi == 2:
                return
            elif gsi < 16:
                self.pic.set_irq(gsi, level)
                self.ioapic.set_irq(gsi, level)
            else:
                self.ioapic.set_irq(gsi, level)

    # -- CPU side ------------------------------------------------------------------------------
    def _extint_path(self, index: int) -> bool:
        """Whether the 8259's output reaches CPU ``index``."""
        if index != 0:
            return False
        if not self.apic_global_enable[0]:
            return True
        return self.lapics[0].extint_enabled() or self.ioapic.pin_is_extint(0)

    def _update(self, index: int) -> None:
        port = self.cpus[index]
        pending = self.lapics[index].highest_deliverable() >= 0 or (
            self.pic.output and self._extint_path(index))
        if pending != self._intr[index]:
            self._intr[index] = pending
            if port is not None:
                port.set_intr(pending)

    def _make_update(self, index: int) -> Callable[[], None]:
        return lambda: self._update(index)

    def _update_all(self) -> None:
        for i in range(len(self.cpus)):
            self._update(i)

    def _pic_output(self, level: bool) -> None:
        self._update(0)

    def ack(self, index: int) -> int:
        """Interrupt acknowledge from vCPU ``index``: the vector to deliver, or -1."""
        with self.lock:
            lapic = self.lapics[index]
            v = lapic.ack()
            if v < 0 and self.pic.output and self._extint_path(index):
                v = self.pic.intack()
            self._update(index)
            return v

    def set_tsc_deadline(self, index: int, deadline_ns: int | None) -> None:
        """IA32_TSC_DEADLINE of CPU ``index`` now means host time ``deadline_ns`` (None: disarmed)."""
        with self.lock:
            self.lapics[index].set_tsc_deadline(deadline_ns)

    def set_apic_global_enable(self, index: int, enabled: bool) -> None:
        """IA32_APIC_BASE.EN of CPU ``index``.  Disabling puts the LAPIC back in its power-up
        state (timer stopped, IRR/ISR clear, software-disabled); the 8259 then drives INTR
        directly (see ``_extint_path``)."""
        with self.lock:
            if not enabled and self.apic_global_enable[index]:
                self.lapics[index].reset()
            self.apic_global_enable[index] = enabled
            self._update(index)

    # -- APIC bus ------------------------------------------------------------------------------
    def deliver_msi(self, address: int, data: int) -> None:
        """One MSI, as the APIC bus delivers it (the :class:`~pyvmm.capabilities.MsiSink` on tcg).

        x86 format: the address is in the LAPIC window (0xFEExxxxx) with the destination in
        bits 19:12 and logical destination mode in bit 2; the data holds the vector in bits 7:0
        and the delivery mode in bits 10:8.  Fixed and lowest-priority messages are delivered;
        any other (guest-chosen) address or mode is counted and dropped.
        """
        if address & layout.MSI_ADDRESS_MASK != layout.MSI_ADDRESS_BASE or address >> 32:
            self.counters["msi_dropped"] += 1
            log.debug("MSI to %#x (not the APIC window) dropped", address)
            return
        mode = (data >> 8) & 7
        if mode not in (DeliveryMode.FIXED, DeliveryMode.LOWEST):
            self.counters["msi_dropped"] += 1
            log.debug("MSI delivery mode %d not supported; dropped", mode)
            return
        with self.lock:
            self.counters["msi"] += 1
            targets = self._targets((address >> 12) & 0xFF, bool(address & 0x4))
            if mode == DeliveryMode.LOWEST:
                targets = targets[:1]
            for lapic in targets:
                lapic.accept(data & 0xFF, False)

    def _targets(self, dest: int, logical: bool) -> list[Lapic]:
        return [la for la in self.lapics if la.match_destination(dest, logical)]

    def _ioapic_deliver(self, vector: int, mode: int, dest: int, logical: bool, level: bool) -> None:
        targets = self._targets(dest, logical)
        if mode == DeliveryMode.LOWEST and targets:
            targets = targets[:1]
        for la in targets:
            if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST):
                la.accept(vector, level)
            elif mode == DeliveryMode.EXTINT:
                self._update(self._index_of[la.apic_id])
            elif mode == DeliveryMode.NMI:
                self._nmi(self._index_of[la.apic_id])

    def _nmi(self, index: int) -> None:
        self.counters["nmi"] += 1
        port = self.cpus[index]
        if port is not None:
            port.raise_nmi()

    def _eoi_broadcast(self, vector: int) -> None:
        self.ioapic.eoi(vector)

    def _send_ipi(self, src: Lapic, icr_lo: int, icr_hi: int) -> None:
        vector = icr_lo & 0xFF
        mode = (icr_lo >> 8) & 7
        shorthand = (icr_lo >> 18) & 3
        if shorthand == 1:
            targets = [src]
        elif shorthand == 2:
            targets = list(self.lapics)
        elif shorthand == 3:
            targets = [la for la in self.lapics if la is not src]
        else:
            targets = self._targets(icr_hi >> 24, bool(icr_lo & (1 << 11)))
        if mode == DeliveryMode.LOWEST and targets:
            targets = targets[:1]
        for la in targets:
            if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST):
                la.accept(vector, False)
            elif mode == DeliveryMode.NMI:
                self._nmi(self._index_of[la.apic_id])
            elif mode == DeliveryMode.INIT:
                if not icr_lo & ICR_LEVEL_ASSERT and icr_lo & ICR_TRIGGER_LEVEL:
                    continue                # INIT level de-assert: only a bus synchronisation
                self.counters["init"] += 1
                port = self.cpus[self._index_of[la.apic_id]]
                if la.apic_id != 0:         # the BSP ignores INIT (no firmware to restart it)
                    la.reset()
                if port is not None:
                    port.init_ipi()
            elif mode == DeliveryMode.STARTUP:
                self.counters["sipi"] += 1
                port = self.cpus[self._index_of[la.apic_id]]
                if port is not None:
                    port.startup_ipi(vector)
