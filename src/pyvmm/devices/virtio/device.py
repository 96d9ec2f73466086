"""The transport-neutral part of a virtio 1.x device.

A :class:`VirtioDevice` holds what the virtio spec calls the device: feature
bits, the status byte, the configuration space and its generation counter,
and the virtqueues.  It knows nothing about how the driver reaches it.  A
transport (virtio-mmio here, virtio-pci later) turns register accesses into
calls on this class and gives the device a :class:`InterruptSink`-like
:class:`VirtioInterrupt` to signal used buffers and configuration changes.
The device never learns which accelerator runs the guest either: eventfds
for ioeventfd/irqfd are a transport/machine matter.

Threads and locks (the rule):

* ``device.lock`` (re-entrant) guards everything in the device: features,
  status, config space, the queues and the back-end state.  Transports take
  it for every register access that reads or changes device state;
  queue handlers run with it held.
* Queue handlers (:meth:`VirtioDevice.handle_queue`) run on the device's
  loop (an :class:`~pyvmm.loop.IOThread` or the main loop) when one was
  given, never on a vCPU thread; without a loop they run on whichever
  thread delivered the notification (tests, simple setups).
* Interrupt state lives in the transport under its own small lock, so a vCPU
  reading InterruptStatus never waits for disk I/O.

A guest that corrupts a ring puts the device into NEEDS_RESET (status bit
0x40 plus a configuration-change interrupt) and the device stops processing
until the driver resets it, as virtio 1.x section 2.1.2 describes.  A handler
or activation that fails for any other reason (a back-end error, a bug) does
the same: one log line through the shared guest-log limit
(:mod:`pyvmm.ratelimit`), the traceback only at debug level.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from enum import IntEnum, IntFlag
from typing import Protocol

from pyvmm.block.iov import iov_from_bytes
from pyvmm.devices.virtio.queue import Virtqueue, VirtqueueError
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit import guest_log

log = logging.getLogger(__name__)


class DeviceId(IntEnum):
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    FS = 26


class Status(IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 0x40
    FAILED = 0x80


class Feature(IntEnum):
    """Transport/ring feature bit numbers (device-specific ones live in each device module)."""

    INDIRECT_DESC = 28
    EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34


_DRIVER_OK, _NEEDS_RESET = int(Status.DRIVER_OK), int(Status.NEEDS_RESET)  # plain ints for the hot path
COMMON_FEATURES = (1 << Feature.VERSION_1) | (1 << Feature.EVENT_IDX) | (1 << Feature.INDIRECT_DESC)


def _describe(e: BaseException) -> str:
    """One line for an unexpected exception: its type and first line of text."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class VirtioInterrupt(Protocol):
    """What a transport offers a device for raising interrupts."""

    def queue_interrupt(self, queue: int) -> None:
        """Used buffers were added to ``queue``."""
        ...

    def config_interrupt(self) -> None:
        """The configuration space (or NEEDS_RESET) changed."""
        ...


class _NoInterrupt:
    def queue_interrupt(self, queue: int) -> None:
        pass

    def config_interrupt(self) -> None:
        pass


class VirtioDevice:
    """Base class: subclasses set ``device_id``, extra features, config bytes and queue handlers."""

    device_id: int = 0

    def __init__(self, memory: GuestMemory, *, name: str, queue_sizes: list[int], features: int = 0,
                 loop: MainLoop | None = None) -> None:
        self.memory = memory
        self.name = name
        self.loop = loop
        self.lock = threading.RLock()
        self.device_features = COMMON_FEATURES | features
        self.queues = [Virtqueue(memory, i, size) for i, size in enumerate(queue_sizes)]
        self.interrupt: VirtioInterrupt = _NoInterrupt()
        self.driver_features = 0
        self.status = 0
        self.config_generation = 0
        self.broken_reason = ""
        # Precomputed per-queue callbacks: a kick from a vCPU allocates nothing.
        self._process_cb = [lambda i=i: self.process_queue(i) for i in range(len(self.queues))]

    # -- wiring --------------------------------------------------------------------------------
    def bind(self, interrupt: VirtioInterrupt) -> None:
        """Called once by the transport that owns this device."""
        self.interrupt = interrupt

    def set_dma_hook(self, hook: Callable[[int, int], None] | None) -> None:
        """Report every guest range this device writes (see :attr:`Virtqueue.dma_hook`).

        The machine passes the tcg accelerator's ``invalidate_code`` here; the device itself
        never learns what the hook is for.
        """
        for q in self.queues:
            q.dma_hook = hook

    # -- features and status -------------------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    def write_driver_features(self, word: int, value: int) -> None:
        """Driver writes 32 feature bits of page ``word``; ignored once FEATURES_OK is set."""
        with self.lock:
            if self.status & Status.FEATURES_OK or not 0 <= word <= 1:
                return
            shift = 32 * word
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | ((value & 0xFFFF_FFFF) << shift)

    def device_feature_word(self, word: int) -> int:
        if not 0 <= word <= 1:
            return 0
        return (self.device_features >> (32 * word)) & 0xFFFF_FFFF

    def set_status(self, value: int) -> None:
        """A driver write of the status byte: reset on 0, the FEATURES_OK handshake, DRIVER_OK."""
        with self.lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return
            new = value & ~self.status
            if new & Status.FEATURES_OK:
                problem = self.check_features()
                if problem:
                    guest_log(log, logging.WARNING, "%s: refusing features %#x: %s", self.name, self.driver_features,
                              problem)
                    value &= ~int(Status.FEATURES_OK)
            # NEEDS_RESET is the device's to set; keep it if it is set, and the driver cannot set it.
            value = (value & ~int(Status.NEEDS_RESET)) | (self.status & Status.NEEDS_RESET)
            self.status = value
            if new & Status.DRIVER_OK and self.status & Status.FEATURES_OK:
                try:
                    self.activate()
                except Exception as e:  # e.g. a back-end that cannot start: the driver sees NEEDS_RESET
                    log.debug("%s: activation failed", self.name, exc_info=True)
                    self.needs_reset(f"activation failed: {_describe(e)}")

    def check_features(self) -> str:
        """Why the driver's feature set is unacceptable, or ``""``."""
        extra = self.driver_features & ~self.device_features
        if extra:
            return f"bits {extra:#x} were not offered"
        if not self.has_feature(Feature.VERSION_1):
            return "VERSION_1 is required (legacy drivers are not supported)"
        return ""

    def activate(self) -> None:
        """DRIVER_OK: the driver is ready.  Subclasses may start back-ends here."""
        log.debug("%s: driver ready, features %#x", self.name, self.driver_features)

    def reset(self) -> None:
        """Device reset (status 0 or machine reset): back to power-on state."""
        with self.lock:
            self.status = 0
            self.driver_features = 0
            self.broken_reason = ""
            for q in self.queues:
                q.reset()
            self.reset_backend()

    def reset_backend(self) -> None:
        """Subclass hook: drop per-driver back-end state on reset."""

    # -- queues --------------------------------------------------------------------------------
    def queue_ready(self, index: int) -> bool:
        """Driver wrote QueueReady=1: validate the rings; a bad ring -> NEEDS_RESET, queue stays off."""
        with self.lock:
            q = self.queues[index]
            try:
                q.activate(self.has_feature(Feature.EVENT_IDX), self.has_feature(Feature.INDIRECT_DESC))
            except VirtqueueError as e:
                self.needs_reset(str(e))
                return False
            return True

    def notify(self, index: int) -> None:
        """The driver kicked queue ``index`` (MMIO write, ioeventfd).  Any thread."""
        if not 0 <= index < len(self.queues):
            return
        if self.loop is not None and not self.loop.in_loop_thread():
            self.loop.call_soon_threadsafe(self._process_cb[index])
        else:
            self.process_queue(index)

    def kick_eventfd(self, index: int) -> int | None:
        """An eventfd of the device's own for queue ``index``'s kicks (vhost-user: the back end
        reads it); a transport with ioeventfd registers it and reads nothing.  None: the
        transport makes one and calls :meth:`notify`."""
        return None

    def call_eventfd(self, index: int) -> int | None:
        """An eventfd someone else signals when queue ``index`` has used buffers (vhost-user's call
        eventfd).  A transport that can turn it into the queue's MSI in the kernel (an irqfd)
        does, and says so with :meth:`set_call_relay`.  None: the device interrupts itself."""
        return None

    def set_call_relay(self, index: int, enabled: bool) -> None:
        """Whether the device itself must relay queue ``index``'s call eventfd (False: an irqfd does)."""

    def ioeventfd_reader(self, fd: int, index: int) -> Callable[[], None]:
        """The loop callback for queue ``index``'s ioeventfd ``fd``: consume the kick, process the queue."""

        def on_kick() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            self.process_queue(index)
        return on_kick

    def process_queue(self, index: int) -> None:
        """Run the handler for queue ``index`` under the device lock; ring errors -> NEEDS_RESET."""
        with self.lock:
            q = self.queues[index]
            if not q.ready or not self.status & _DRIVER_OK or self.status & _NEEDS_RESET:
                return
            try:
                if not self.drains(q):
                    self.handle_queue(q)
                    return
                # Suppress kicks while draining the ring; after re-enabling, look again for
                # buffers the driver added without kicking (it saw notifications disabled).
                for _ in range(64):
                    q.set_notification(False)
                    try:
                        self.handle_queue(q)
                    finally:
                        q.set_notification(True)  # never leave the driver thinking we poll
                    if not q.has_pending():
                        break
                else:
                    # A driver that never stops adding: let other work run, continue later.
                    if self.loop is not None:
                        self.loop.call_soon_threadsafe(self._process_cb[index])
            except VirtqueueError as e:
                self.needs_reset(str(e))
            except Exception as e:  # a back-end failure: one line and NEEDS_RESET, never a traceback
                log.debug("%s: queue %d handler failed", self.name, index, exc_info=True)
                self.needs_reset(f"queue {index} handler failed: {_describe(e)}")

    def drains(self, queue: Virtqueue) -> bool:
        """Whether :meth:`handle_queue` consumes every available buffer of ``queue``.

        False for queues whose buffers wait for host events (a console's receive queue);
        those get no kick suppression or re-check loop.
        """
        return True

    def handle_queue(self, queue: Virtqueue) -> None:
        """Subclass hook: consume the available buffers of ``queue`` (device lock held)."""
        raise NotImplementedError

    def complete(self, queue: Virtqueue, head: int, written: int) -> None:
        """Push one used element; interrupt if the driver wants one now."""
        queue.push(head, written)
        if queue.should_notify():
            self.interrupt.queue_interrupt(queue.index)

    def notify_used(self, queue: Virtqueue) -> None:
        """After pushing a batch: one interrupt if the driver asked for one (EVENT_IDX or flags)."""
        if queue.should_notify():
            self.interrupt.queue_interrupt(queue.index)

    def deliver_input(self, queue: Virtqueue, pending: bytearray) -> None:
        """Copy host input waiting in ``pending`` into the guest's receive buffers, as far as they go.

        What was delivered is removed from ``pending``; one interrupt for the batch.
        """
        pushed = False
        while pending:
            chain = queue.pop()
            if chain is None:
                break
            try:
                n = iov_from_bytes(chain.writable, bytes(pending))
            finally:
                chain.release()
            del pending[:n]
            queue.push(chain.head, n)
            pushed = True
        if pushed:
            self.notify_used(queue)

    def needs_reset(self, reason: str) -> None:
        with self.lock:
            if self.status & Status.NEEDS_RESET:
                return
            guest_log(log, logging.WARNING, "%s: device needs reset: %s", self.name, reason)
            self.broken_reason = reason
            self.status |= Status.NEEDS_RESET
            if self.status & Status.DRIVER_OK:
                self.interrupt.config_interrupt()

    # -- configuration space -------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        """Subclass hook: the current configuration space, little-endian."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """Subclass hook: the driver wrote ``data`` at ``offset`` of the config space."""

    def read_config(self, offset: int, size: int) -> int:
        with self.lock:
            cfg = self.config_bytes()
            if offset < 0 or offset + size > len(cfg):
                return 0
            return int.from_bytes(cfg[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset < 0 or offset + size > len(self.config_bytes()):
                return
            self.config_write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def config_changed(self) -> None:
        """The device changed its configuration space: bump the generation and interrupt."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if self.status & Status.DRIVER_OK:
                self.interrupt.config_interrupt()

    def close(self) -> None:
        """Release back-end resources (files, fds).  Subclasses extend."""
