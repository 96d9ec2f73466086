"""MSI-X: the capability, the vector table and the pending-bit array (PCI 3.0 section 6.8.2).

The table and PBA live in one of the device's memory BARs; the device
forwards accesses to that BAR range here.  Each table entry is 16 bytes
(address low/high, data, vector control with bit 0 = masked).  A vector
that fires while masked (per entry or by the function mask) sets its
pending bit and is delivered when it is unmasked, as the spec requires.

Delivery goes through a pluggable *MSI sender* ``sender(address, data)``:
on KVM the accelerator sink's ``signal_msi`` (KVM_SIGNAL_MSI).  A machine
whose interrupt controllers cannot take MSIs gives no sender, and then
devices must not advertise the capability at all (see
:meth:`~pyvmm.devices.pci.host.PciHost.msi_capable`).

Threads: the table is written by vCPU threads and :meth:`MsixTable.notify`
runs on device threads, so everything is under ``self.lock``; the sender
is called with that lock held, which keeps a vector's delivery and its
masking ordered.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable

from pyvmm.devices.pci.config import CapId, ConfigSpace
from pyvmm.ratelimit import guest_log

log = logging.getLogger(__name__)

MsiSender = Callable[[int, int], None]

ENTRY_SIZE = 16
MAX_VECTORS = 2048
CTRL_ENABLE = 1 << 15
CTRL_FUNCTION_MASK = 1 << 14
ENTRY_MASKED = 1
NO_VECTOR = 0xFFFF
_ENTRY = struct.Struct("<IIII")


class MsixTable:
    """MSI-X state of one function: ``nvectors`` entries in BAR ``bar`` at ``table_offset``/``pba_offset``."""

    def __init__(self, config: ConfigSpace, nvectors: int, bar: int, table_offset: int, pba_offset: int,
                 sender: MsiSender) -> None:
        if not 1 <= nvectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X vector count {nvectors} out of range")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.nvectors = nvectors
        self.bar = bar
        self.table_offset = table_offset
        self.table_size = nvectors * ENTRY_SIZE
        self.pba_offset = pba_offset
        self.pba_size = ((nvectors + 63) // 64) * 8
        self.sender = sender
        self.config = config
        self.lock = threading.Lock()
        body = struct.pack("<HII", nvectors - 1, table_offset | bar, pba_offset | bar)
        self.cap_offset = config.add_capability(CapId.MSIX, body, wmask=struct.pack("<HII", 0xC000, 0, 0))
        self.delivered = 0
        #: Called (without the lock) after the guest changed an entry, the enable or the function mask:
        #: whoever delivers vectors outside this class (irqfds) looks again at :meth:`message`.
        self.on_change: Callable[[], None] | None = None
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.table = bytearray(self.table_size)
            for i in range(self.nvectors):
                self.table[i * ENTRY_SIZE + 12] = ENTRY_MASKED
            self.pending = 0
            self.config.set_u16(self.cap_offset + 2, self.nvectors - 1)

    # -- state --------------------------------------------------------------------------------------
    def _control(self) -> int:
        return self.config.get(self.cap_offset + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self._control() & CTRL_ENABLE)

    def covers(self, offset: int, size: int) -> str | None:
        """``"table"``/``"pba"`` if a BAR access at ``offset`` falls in that structure."""
        if self.table_offset <= offset and offset + size <= self.table_offset + self.table_size:
            return "table"
        if self.pba_offset <= offset and offset + size <= self.pba_offset + self.pba_size:
            return "pba"
        return None

    def in_range(self, offset: int) -> bool:
        return (self.table_offset <= offset < self.table_offset + self.table_size
                or self.pba_offset <= offset < self.pba_offset + self.pba_size)

    # -- BAR accesses -------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size:
            return 0
        with self.lock:
            where = self.covers(offset, size)
            if where == "table":
                o = offset - self.table_offset
                return int.from_bytes(self.table[o:o + size], "little")
            if where == "pba":
                o = offset - self.pba_offset
                return (self.pending >> (8 * o)) & ((1 << (8 * size)) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size:
            return
        with self.lock:
            if self.covers(offset, size) != "table":
                return  # the PBA is read-only
            o = offset - self.table_offset
            self.table[o:o + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            first, last = o // ENTRY_SIZE, (o + size - 1) // ENTRY_SIZE
            for vector in range(first, last + 1):
                self._deliver_if_unmasked(vector)
        if self.on_change is not None:
            self.on_change()

    def control_written(self) -> None:
        """The guest wrote the capability's message control: deliver what the unmask released."""
        with self.lock:
            if self.pending:
                for vector in range(self.nvectors):
                    if self.pending >> vector & 1:
                        self._deliver_if_unmasked(vector)
        if self.on_change is not None:
            self.on_change()

    # -- delivery -----------------------------------------------------------------------------------
    def _entry(self, vector: int) -> tuple[int, int, bool]:
        lo, hi, data, ctrl = _ENTRY.unpack_from(self.table, vector * ENTRY_SIZE)
        return (hi << 32) | lo, data, bool(ctrl & ENTRY_MASKED)

    def message(self, vector: int) -> tuple[int, int] | None:
        """(address, data) ``vector`` sends now; None while MSI-X is off or the vector masked or invalid."""
        if not 0 <= vector < self.nvectors:
            return None
        with self.lock:
            if not self.enabled or self._masked(vector):
                return None
            addr, data, _ = self._entry(vector)
            return addr, data

    def _masked(self, vector: int) -> bool:
        return bool(self._control() & CTRL_FUNCTION_MASK) or self._entry(vector)[2]

    def _deliver_if_unmasked(self, vector: int) -> None:
        if self.pending >> vector & 1 and self.enabled and not self._masked(vector):
            self.pending &= ~(1 << vector)
            self._send(vector)

    def _send(self, vector: int) -> None:
        addr, data, _ = self._entry(vector)
        self.delivered += 1
        try:
            self.sender(addr, data)
        except Exception as e:  # a refused MSI must not kill the device thread
            guest_log(log, logging.WARNING, "MSI-X vector %d (addr %#x data %#x) not delivered: %s", vector, addr,
                      data, e)

    def notify(self, vector: int) -> bool:
        """Fire ``vector``; False if MSI-X is disabled or the vector is invalid (caller may use INTx)."""
        if not 0 <= vector < self.nvectors:
            return False
        with self.lock:
            if not self.enabled:
                return False
            if self._masked(vector):
                self.pending |= 1 << vector
            else:
                self._send(vector)
            return True
