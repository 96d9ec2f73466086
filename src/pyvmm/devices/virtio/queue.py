"""virtio 1.x split virtqueues, walked defensively.

The guest owns the three rings (descriptor table, available ring, used
ring) and may write anything into them at any time, so every value read from
them is treated as hostile:

* ring addresses must be aligned (16/2/4 bytes) and lie in guest RAM when the
  driver sets QueueReady (:meth:`Virtqueue.validate`);
* the available index may run at most ``size`` entries ahead of what the
  device has consumed, and every head/next index must be below the table size;
* a chain visits at most ``size`` descriptors (so a loop ends), an indirect
  table at most ``len / 16`` (and no more than :data:`MAX_INDIRECT_DESCS` or
  the queue size), and an indirect table may not hold another;
* the available index is read once per pop: a guest that rewrites it between
  two reads (e.g. :meth:`Virtqueue.available` and :meth:`Virtqueue.pop`) gets
  "nothing available" or NEEDS_RESET, never an inconsistent chain;
* device-writable descriptors may only follow device-readable ones;
* the sum of the lengths in a chain is capped (:data:`MAX_CHAIN_BYTES`);
* every buffer becomes a :meth:`GuestMemory.view`, which refuses ranges that
  are not wholly inside RAM.

Any violation raises :class:`VirtqueueError`, the one error type this module
lets escape; the device decides whether that fails one request or puts the
device into NEEDS_RESET.

Threading: a :class:`Virtqueue` has no lock of its own.  Its owner (the
device) touches it only with the device lock held, from one thread at a time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag

from pyvmm.errors import GuestMemoryError, PyvmmError
from pyvmm.memory import GuestMemory

#: Cap on the total bytes one descriptor chain may describe.
MAX_CHAIN_BYTES = 256 << 20
#: Largest queue size virtio allows for split rings.
MAX_QUEUE_SIZE = 32768
#: Most descriptors one indirect table may hold (QEMU's VIRTQUEUE_MAX_SIZE; Linux's IOV_MAX), unless
#: the queue itself is larger.  Bounds the host objects one request can make.
MAX_INDIRECT_DESCS = 1024

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")


class VirtqueueError(PyvmmError):
    """The guest put something invalid into a virtqueue (bad ring, chain or buffer)."""


class DescFlags(IntFlag):
    NEXT = 1
    WRITE = 2
    INDIRECT = 4


# Plain ints for the hot path (IntFlag arithmetic costs a Python-level call per operation).
_NEXT, _WRITE, _INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)


class AvailFlags(IntFlag):
    NO_INTERRUPT = 1


class UsedFlags(IntFlag):
    NO_NOTIFY = 1


@dataclass
class DescChain:
    """One popped request: its head index and its buffers as zero-copy views of guest RAM.

    ``readable`` are the device-readable buffers in chain order, then ``writable``.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0
    #: (gpa, length) of the device-writable buffers, kept only when the queue has a dma_hook.
    written_ranges: list[tuple[int, int]] = field(default_factory=list)
    dma_hook: Callable[[int, int], None] | None = None

    def release(self) -> None:
        """Done with the buffers: report device-writable ranges to the DMA hook, drop the views.

        Devices call this before pushing the chain to the used ring, so a software CPU has
        dropped translated code for the written memory before the driver can use it.
        """
        hook = self.dma_hook
        if hook is not None:
            self.dma_hook = None
            for gpa, length in self.written_ranges:
                hook(gpa, length)
        for v in self.readable:
            v.release()
        for v in self.writable:
            v.release()
        self.readable.clear()
        self.writable.clear()


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio's vring_need_event: did the index move past ``event_idx`` going old -> new?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class Virtqueue:
    """Device side of one split virtqueue."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int,
                 max_chain_bytes: int = MAX_CHAIN_BYTES) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} must be a power of two <= {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.max_chain_bytes = max_chain_bytes
        #: Called with (gpa, length) for each device-writable buffer when its chain is released.
        #: The machine sets it to the tcg accelerator's invalidate_code (unicorn does not see
        #: host writes to guest RAM); None on KVM.  Survives device resets.
        self.dma_hook: Callable[[int, int], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.event_idx = False
        self.indirect = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.notify_enabled = True

    # -- setup ---------------------------------------------------------------------------------
    def ring_sizes(self) -> tuple[int, int, int]:
        n = self.size
        return DESC_SIZE * n, 6 + 2 * n, 6 + 8 * n

    def validate(self) -> None:
        """Check size, alignment and that all three rings are in RAM (at QueueReady)."""
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise VirtqueueError(f"queue {self.index}: size {n} is not a power of two <= {self.max_size}")
        dsz, asz, usz = self.ring_sizes()
        for name, addr, align, sz in (("descriptor table", self.desc_addr, 16, dsz),
                                      ("available ring", self.avail_addr, 2, asz),
                                      ("used ring", self.used_addr, 4, usz)):
            if addr % align:
                raise VirtqueueError(f"queue {self.index}: {name} at {addr:#x} is not {align}-byte aligned")
            if not self.memory.contains(addr, sz):
                raise VirtqueueError(f"queue {self.index}: {name} {addr:#x}+{sz:#x} is outside guest RAM")

    def activate(self, event_idx: bool, indirect: bool) -> None:
        """Validate and mark ready; the negotiated ring features are fixed from here on."""
        self.validate()
        self.event_idx = event_idx
        self.indirect = indirect
        self.ready = True

    # -- available ring ------------------------------------------------------------------------
    def _avail_idx(self) -> int:
        return self.memory.read_u16(self.avail_addr + 2)

    def has_pending(self) -> bool:
        """Whether the driver has made buffers available that were not popped yet."""
        if not self.ready:
            return False
        try:
            return self._avail_idx() != self.last_avail_idx
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: {e}") from None

    def available(self) -> int:
        """How many chains the driver has made available and not popped yet (0 to ``size``).

        Advisory: the guest may change the index right after this read, so :meth:`pop` can
        still return None.  An index more than ``size`` ahead raises VirtqueueError.
        """
        if not self.ready:
            return 0
        try:
            pending = (self._avail_idx() - self.last_avail_idx) & 0xFFFF
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: {e}") from None
        if pending > self.size:
            raise VirtqueueError(f"queue {self.index}: available index is {pending} entries ahead "
                                 f"of {self.last_avail_idx} (queue size {self.size})")
        return pending

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` popped chains (not pushed): the next pops return them again."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    def pop(self) -> DescChain | None:
        """The next available chain, or None if the ring is empty.  Raises VirtqueueError."""
        if not self.ready:
            return None
        try:
            return self._pop()
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: {e}") from None

    def _pop(self) -> DescChain | None:
        mem = self.memory
        n = self.size
        avail = self._avail_idx()
        if avail == self.last_avail_idx:
            if not self.event_idx or not self.notify_enabled:
                return None
            # Ask for a kick on the next buffer, then look again: a buffer added between the
            # first read and this write would otherwise go unnoticed until the next kick.
            self._write_avail_event(self.last_avail_idx)
            avail = self._avail_idx()
            if avail == self.last_avail_idx:
                return None
        pending = (avail - self.last_avail_idx) & 0xFFFF
        if pending > n:
            raise VirtqueueError(f"queue {self.index}: available index {avail} is {pending} entries ahead "
                                 f"of {self.last_avail_idx} (queue size {n})")
        head = mem.read_u16(self.avail_addr + 4 + 2 * (self.last_avail_idx % n))
        if head >= n:
            raise VirtqueueError(f"queue {self.index}: head index {head} >= queue size {n}")
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx and self.notify_enabled:
            self._write_avail_event(self.last_avail_idx)
        return chain

    def _walk(self, head: int) -> DescChain:
        mem = self.memory
        n = self.size
        chain = DescChain(head, dma_hook=self.dma_hook)
        track = self.dma_hook is not None
        table, limit, idx = self.desc_addr, n, head
        in_indirect = False
        seen_write = False
        total = 0
        steps = 0
        try:
            while True:
                steps += 1
                if steps > limit:
                    raise VirtqueueError(f"queue {self.index}: descriptor chain from head {head} is longer "
                                         f"than {limit} (a loop?)")
                addr, length, flags, nxt = _DESC.unpack(mem.read(table + DESC_SIZE * idx, DESC_SIZE))
                if flags & _INDIRECT:
                    if in_indirect:
                        raise VirtqueueError(f"queue {self.index}: nested indirect descriptor table")
                    if not self.indirect:
                        raise VirtqueueError(f"queue {self.index}: indirect descriptor without INDIRECT_DESC")
                    if flags & _NEXT:
                        raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT set")
                    if length == 0 or length % DESC_SIZE:
                        raise VirtqueueError(f"queue {self.index}: indirect table length {length} is not a "
                                             f"positive multiple of {DESC_SIZE}")
                    if length // DESC_SIZE > max(MAX_INDIRECT_DESCS, n):
                        raise VirtqueueError(f"queue {self.index}: indirect table of {length // DESC_SIZE} "
                                             "descriptors is too long")
                    if not mem.contains(addr, length):
                        raise VirtqueueError(f"queue {self.index}: indirect table {addr:#x}+{length:#x} "
                                             "is outside guest RAM")
                    table, limit, idx, steps = addr, length // DESC_SIZE, 0, 0
                    in_indirect = True
                    continue
                total += length
                if total > self.max_chain_bytes:
                    raise VirtqueueError(f"queue {self.index}: chain from head {head} describes more than "
                                         f"{self.max_chain_bytes} bytes")
                view = mem.view(addr, length)
                if flags & _WRITE:
                    seen_write = True
                    chain.writable.append(view)
                    chain.write_len += length
                    if track and length:
                        chain.written_ranges.append((addr, length))
                else:
                    if seen_write:
                        view.release()
                        raise VirtqueueError(f"queue {self.index}: device-readable descriptor after a "
                                             "device-writable one")
                    chain.readable.append(view)
                    chain.read_len += length
                if not flags & _NEXT:
                    return chain
                if nxt >= limit:
                    raise VirtqueueError(f"queue {self.index}: next index {nxt} >= table size {limit}")
                idx = nxt
        except BaseException:
            chain.dma_hook = None  # nothing was written
            chain.release()
            raise

    # -- used ring -----------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into it."""
        try:
            n = self.size
            slot = self.used_addr + 4 + 8 * (self.used_idx % n)
            self.memory.write(slot, struct.pack("<II", head, written & 0xFFFF_FFFF))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            # The element is in place before the index that publishes it (program order; x86 TSO).
            self.memory.write_u16(self.used_addr + 2, self.used_idx)
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: {e}") from None

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for the buffers pushed since the last one."""
        try:
            if self.event_idx:
                old, new = self.signalled_used, self.used_idx
                valid = self.signalled_used_valid
                self.signalled_used = new
                self.signalled_used_valid = True
                if not valid:
                    return True
                used_event = self.memory.read_u16(self.avail_addr + 4 + 2 * self.size)
                return need_event(used_event, new, old)
            return not self.memory.read_u16(self.avail_addr) & 1  # VRING_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: {e}") from None

    def _write_avail_event(self, value: int) -> None:
        self.memory.write_u16(self.used_addr + 4 + 8 * self.size, value)

    def set_notification(self, enable: bool) -> None:
        """Ask the driver to kick (enable) or not to kick (disable) for new buffers.

        While disabled (a device busy with a batch), EVENT_IDX's avail_event is left where it
        is, so the driver stops kicking once it has passed it.  After enabling, the caller
        must check :meth:`has_pending` again (a buffer may have slipped in meanwhile).
        """
        self.notify_enabled = enable
        try:
            if self.event_idx:
                if enable:
                    self._write_avail_event(self.last_avail_idx)
                return  # with EVENT_IDX, "disabled" simply means avail_event is left behind
            flags = self.memory.read_u16(self.used_addr)
            flags = flags & ~int(UsedFlags.NO_NOTIFY) if enable else flags | int(UsedFlags.NO_NOTIFY)
            self.memory.write_u16(self.used_addr, flags)
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: {e}") from None
