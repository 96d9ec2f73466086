"""vhost-user-fs (virtio 1.x section 5.11, virtio-fs): a shared directory served by virtiofsd.

QEMU's spelling::

    -chardev socket,id=c,path=/run/vfs.sock
    -device vhost-user-fs-pci,chardev=c,tag=share        (or vhost-user-fs-device on virtio-mmio)
    -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem

The device's configuration (the tag and the number of request queues) lives here; its queues
(queue 0 "hiprio", then the request queues) are handed to the back end over vhost-user
(:mod:`pyvmm.vhost_user.frontend`) at DRIVER_OK, so the guest reaches host files only through
what virtiofsd serves.  pyvmm never reads the FUSE requests while the back end runs.

Notifications: each queue has a kick eventfd and a call eventfd the back end holds.  A guest
kick that exits to the VMM is one ``eventfd_write``; where the accelerator has ioeventfd
(KVM) the transport registers the kick eventfd itself, so kicks go from the guest to
virtiofsd without pyvmm.  Calls are read on the iothread and raised through the transport
(MSI-X or the virtio-mmio line), after telling a software CPU (tcg) what the back end wrote.

A back end that dies (or stops answering) is logged once and the device answers every
request it still holds, and every later one, with EIO (a FUSE reply header), so the guest's
file operations fail instead of hanging and the VMM runs on.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable

from pyvmm.block.iov import iov_from_bytes, iov_slice, iov_to_bytes
from pyvmm.devices.virtio.device import COMMON_FEATURES, DeviceId, Feature, VirtioDevice
from pyvmm.devices.virtio.queue import DESC_SIZE, MAX_INDIRECT_DESCS, DescFlags, Virtqueue
from pyvmm.errors import ConfigError, GuestMemoryError
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.qdev import DeviceContext, DeviceProps, Prop, PropType, VirtioType
from pyvmm.ratelimit import guest_log
from pyvmm.vhost_user.frontend import VhostUserFrontend, new_eventfd
from pyvmm.vhost_user.protocol import MAX_MEM_REGIONS, MemRegion, ProtocolError
from pyvmm.vmstate import VmStateError

log = logging.getLogger(__name__)

TAG_SIZE = 36
DEFAULT_QUEUE_SIZE = 128
MAX_QUEUE_SIZE = 1024  # QEMU's VIRTQUEUE_MAX_SIZE for vhost-user-fs
MAX_REQUEST_QUEUES = 32

_FUSE_IN_HEADER = struct.Struct("<IIQ")  # len, opcode, unique (then nodeid, uid, gid, pid...)
_FUSE_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_FUSE_FORGET, _FUSE_BATCH_FORGET = 2, 42  # no reply expected
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U32 = struct.Struct("<I")
_NEXT, _WRITE, _INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)


class VhostUserFs(VirtioDevice):
    device_id = DeviceId.FS

    def __init__(self, memory: GuestMemory, frontend: VhostUserFrontend, *, tag: str, num_request_queues: int = 1,
                 queue_size: int = DEFAULT_QUEUE_SIZE, name: str = "vhost-user-fs",
                 loop: MainLoop | None = None) -> None:
        super().__init__(memory, name=name, queue_sizes=[queue_size] * (1 + num_request_queues), loop=loop)
        self.frontend = frontend
        self.tag = tag
        self.num_request_queues = num_request_queues
        # The ring features the back end implements (it runs the rings); pyvmm adds none of its own.
        self.device_features = frontend.features & COMMON_FEATURES
        nq = len(self.queues)
        self.kick_fds = [new_eventfd() for _ in range(nq)]
        self.call_fds = [new_eventfd() for _ in range(nq)]
        self.err_fd = new_eventfd()
        self._started: list[int] = []  # queues handed to the back end
        self._seen_used = [0] * nq  # per queue: used index up to which written ranges were reported
        self._dma_hook: Callable[[int, int], None] | None = None
        self.failing = False  # the back end is gone: requests get EIO
        self._relays = [self._call_relay(i, fd) for i, fd in enumerate(self.call_fds)]
        if loop is not None:
            for fd, relay in zip(self.call_fds, self._relays, strict=True):
                loop.add_reader(fd, relay)
            loop.add_reader(self.err_fd, self._on_vring_error)
            frontend.watch(loop, self.backend_gone)

    # -- what the transports ask -----------------------------------------------------------------
    def kick_eventfd(self, index: int) -> int | None:
        """The eventfd a transport's ioeventfd should signal for queue ``index`` (the back end reads it)."""
        return self.kick_fds[index] if 0 <= index < len(self.kick_fds) else None

    def notify(self, index: int) -> None:
        if not 0 <= index < len(self.queues):
            return
        if self.failing:
            super().notify(index)
            return
        os.eventfd_write(self.kick_fds[index], 1)

    def call_eventfd(self, index: int) -> int | None:
        return self.call_fds[index] if 0 <= index < len(self.call_fds) else None

    def set_call_relay(self, index: int, enabled: bool) -> None:
        """An irqfd (KVM, MSI-X) takes queue ``index``'s calls straight to the guest, or gives them back."""
        if self.loop is None or not 0 <= index < len(self.call_fds):
            return
        if enabled:
            self.loop.add_reader(self.call_fds[index], self._relays[index])
            os.eventfd_write(self.call_fds[index], 1)  # a call may have come while the vector was moving
        else:
            self.loop.remove_reader(self.call_fds[index])

    def set_dma_hook(self, hook: Callable[[int, int], None] | None) -> None:
        super().set_dma_hook(hook)
        self._dma_hook = hook

    # -- configuration space ----------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return self.tag.encode().ljust(TAG_SIZE, b"\0") + struct.pack("<I", self.num_request_queues)

    # -- starting and stopping the back end's rings ---------------------------------------------------
    def _mem_regions(self) -> list[MemRegion]:
        return [MemRegion(r.gpa, r.size, r.host_addr, r.fd_offset, r.fd) for r in self.memory.regions]

    def activate(self) -> None:
        super().activate()
        if self.failing:
            self._take_over_queues()
            return
        fe = self.frontend
        try:
            fe.set_features(self.driver_features)
            fe.set_mem_table(self._mem_regions())
            started = []
            for q in self.queues:
                if not q.ready:
                    continue
                i = q.index
                dsz, asz, usz = q.ring_sizes()
                fe.set_vring_num(i, q.size)
                fe.set_vring_base(i, q.last_avail_idx)
                fe.set_vring_addr(i, self.memory.host_address(q.desc_addr, dsz),
                                  self.memory.host_address(q.used_addr, usz),
                                  self.memory.host_address(q.avail_addr, asz))
                fe.set_vring_kick(i, self.kick_fds[i])
                fe.set_vring_call(i, self.call_fds[i])
                fe.set_vring_err(i, self.err_fd)
                self._seen_used[i] = q.used_idx
                started.append(i)
            if fe.has_protocol_features:
                for i in started:
                    fe.set_vring_enable(i, True)
            self._started = started
            log.debug("%s: queues %s handed to the back end", self.name, started)
        except (ProtocolError, GuestMemoryError) as e:
            self.backend_gone(str(e))

    def reset_backend(self) -> None:
        """Device reset: stop the back end's rings (SET_VRING_ENABLE 0, GET_VRING_BASE)."""
        started, self._started = self._started, []
        if self.failing or not started:
            return
        fe = self.frontend
        try:
            for i in started:
                if fe.has_protocol_features:
                    fe.set_vring_enable(i, False)
                fe.get_vring_base(i)
        except ProtocolError as e:
            self.backend_gone(str(e))
        for fd in self.call_fds:  # a call the back end sent before it stopped is stale now
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    # -- calls: the back end used buffers ----------------------------------------------------------
    def _call_relay(self, index: int, fd: int) -> Callable[[], None]:
        def on_call() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            if self._dma_hook is not None:
                self._report_written(index)
            self.interrupt.queue_interrupt(index)
        return on_call

    def _report_written(self, index: int) -> None:
        """Tell the DMA observer (tcg) which guest buffers the back end filled since the last call.

        Only the used elements new since the last call are looked at, and of their chains only
        the device-writable descriptors, read straight from the rings with every index and
        length bounded (a chain the guest rewrote meanwhile reports garbage ranges, which the
        observer clips to RAM; it never loops: at most ``size`` steps per table).
        """
        hook = self._dma_hook
        if hook is None:
            return
        with self.lock:
            q = self.queues[index]
            if not q.ready:
                return
            mem, n = self.memory, q.size
            try:
                used = mem.read_u16(q.used_addr + 2)
                seen, self._seen_used[index] = self._seen_used[index], used
                count = min((used - seen) & 0xFFFF, n)
                if not count:
                    return
                table = mem.read(q.desc_addr, DESC_SIZE * n)
                ring = mem.read(q.used_addr + 4, 8 * n)
                ranges: list[tuple[int, int]] = []
                for k in range(count):
                    head = _U32.unpack_from(ring, 8 * ((seen + k) % n))[0]
                    if head < n:
                        self._written_ranges(table, n, head, ranges)
            except GuestMemoryError:
                return
        # One report per run of adjacent buffers (each report costs the software CPU a kick).
        ranges.sort()
        start, end = -1, -1
        for addr, length in ranges:
            if addr <= end:
                end = max(end, addr + length)
                continue
            if end > start >= 0:
                hook(start, end - start)
            start, end = addr, addr + length
        if end > start >= 0:
            hook(start, end - start)

    def _written_ranges(self, table: bytes, n: int, idx: int, out: list[tuple[int, int]]) -> None:
        for _ in range(n):
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * idx)
            if flags & _INDIRECT:
                count = min(length // DESC_SIZE, MAX_INDIRECT_DESCS)
                if count:
                    indirect = self.memory.read(addr, DESC_SIZE * count)
                    for j in range(count):
                        a, ln, f, _nx = _DESC.unpack_from(indirect, DESC_SIZE * j)
                        if f & _WRITE and ln:
                            out.append((a, ln))
                return
            if flags & _WRITE and length:
                out.append((addr, length))
            if not flags & _NEXT or nxt >= n:
                return
            idx = nxt

    def _on_vring_error(self) -> None:
        try:
            os.eventfd_read(self.err_fd)
        except BlockingIOError:
            return
        guest_log(log, logging.WARNING, "%s: the vhost-user back end reports a virtqueue error", self.name)

    # -- the back end is gone ------------------------------------------------------------------------
    def backend_gone(self, reason: str) -> None:
        """One line, then every request gets EIO from here on (never a hang)."""
        with self.lock:
            if self.failing:
                return
            self.failing = True
            self._started = []
            log.warning("%s: vhost-user back end %s is gone (%s); requests now fail with EIO", self.name,
                        self.frontend.path, reason)
            self.frontend.close()
            if self.loop is not None:  # ioeventfd kicks now come to pyvmm
                for i, fd in enumerate(self.kick_fds):
                    self.loop.add_reader(fd, self.ioeventfd_reader(fd, i))
            self._take_over_queues()
        for i in range(len(self.queues)):
            self.notify(i)

    def _take_over_queues(self) -> None:
        """Continue the rings where the back end left them: every buffer it did not use is failed."""
        for q in self.queues:
            if not q.ready:
                continue
            try:
                used = self.memory.read_u16(q.used_addr + 2)
            except GuestMemoryError:
                continue
            q.used_idx = q.last_avail_idx = used
            q.signalled_used_valid = False

    def handle_queue(self, queue: Virtqueue) -> None:
        """Only while failing: answer each request with a FUSE error reply (EIO)."""
        if not self.failing:
            return
        pushed = False
        while (chain := queue.pop()) is not None:
            written = 0
            try:
                head = iov_to_bytes(iov_slice(chain.readable, 0, _FUSE_IN_HEADER.size))
                if len(head) == _FUSE_IN_HEADER.size and chain.write_len >= _FUSE_OUT_HEADER.size:
                    _len, opcode, unique = _FUSE_IN_HEADER.unpack(head)
                    if opcode not in (_FUSE_FORGET, _FUSE_BATCH_FORGET):
                        reply = _FUSE_OUT_HEADER.pack(_FUSE_OUT_HEADER.size, -errno.EIO, unique)
                        written = iov_from_bytes(chain.writable, reply)
            finally:
                chain.release()
            queue.push(chain.head, written)
            pushed = True
        if pushed:
            self.notify_used(queue)

    # -- VM state (pyvmm.vmstate) -------------------------------------------------------------------
    def save_backend_state(self) -> None:
        """Refused, as QEMU marks vhost-user-fs unmigratable: virtiofsd holds the guest's FUSE session
        (inodes, open files) and the rings' positions, and nothing would give them to a new one."""
        raise VmStateError(f"{self.name}: a vhost-user-fs device cannot be saved or migrated (its back end, "
                           "virtiofsd, holds the guest's open files)")

    def close(self) -> None:
        if self.loop is not None:
            for fd in (*self.call_fds, self.err_fd, *self.kick_fds):
                self.loop.remove_reader(fd)
        self.frontend.close()
        for fd in (*self.call_fds, self.err_fd, *self.kick_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self.call_fds, self.kick_fds, self.err_fd = [], [], -1


# -- its registry entry (pyvmm.qdev): vhost-user-fs-pci, vhost-user-fs-device --------------------------
def _create(ctx: DeviceContext, props: DeviceProps) -> VhostUserFs:
    name = props.name("vhost-user-fs")
    chardev = props.get_str("chardev")
    if not chardev:  # QEMU's messages (hw/virtio/vhost-user-fs.c)
        raise ConfigError("missing chardev")
    tag = props.get_str("tag")
    if not tag:
        raise ConfigError("missing tag property")
    if len(tag.encode()) > TAG_SIZE:
        raise ConfigError(f"tag property must be {TAG_SIZE} bytes or less")
    nrq = props.get_int("num-request-queues")
    if nrq < 1:
        raise ConfigError("num-request-queues property must be larger than 0")
    if nrq > MAX_REQUEST_QUEUES:
        raise ConfigError(f"pyvmm cannot honour num-request-queues={nrq} (at most {MAX_REQUEST_QUEUES})")
    qsize = props.get_int("queue-size")
    if qsize < 1 or qsize & (qsize - 1):
        raise ConfigError("queue-size property must be a power of 2")
    if qsize > MAX_QUEUE_SIZE:
        raise ConfigError(f"queue-size property must be {MAX_QUEUE_SIZE} or smaller")
    path = ctx.chardev_socket_path(chardev)
    memory = ctx.memory
    if not memory.shareable:
        raise ConfigError(f"{name}: guest RAM must be shared with the vhost-user back end: use -object memory-"
                          f"backend-memfd,id=mem,size={memory.ram_size >> 20}M,share=on -machine memory-backend=mem")
    if len(memory.regions) > MAX_MEM_REGIONS:
        raise ConfigError(f"{name}: guest RAM has more than {MAX_MEM_REGIONS} regions")
    try:
        frontend = VhostUserFrontend(path, name=name)
        frontend.handshake()
    except ProtocolError as e:
        raise ConfigError(f"{name}: vhost-user back end at {path}: {e}") from None
    if not frontend.features >> Feature.VERSION_1 & 1:
        frontend.close()
        raise ConfigError(f"{name}: the vhost-user back end does not offer VIRTIO_F_VERSION_1")
    if frontend.queue_num is not None and frontend.queue_num < 1 + nrq:
        frontend.close()
        raise ConfigError(f"{name}: the back end serves {frontend.queue_num} queues, {1 + nrq} are needed")
    return VhostUserFs(memory, frontend, tag=tag, num_request_queues=nrq, queue_size=qsize, name=name,
                       loop=ctx.iothread)


DEVICE_TYPES = [VirtioType(
    "vhost-user-fs", _create,
    (Prop("chardev", PropType.STR, None, "ID of a chardev to use as a backend"),
     Prop("tag", PropType.STR, None, "the mount tag the guest sees"),
     Prop("num-request-queues", PropType.UINT16, 1, "request queues (plus the hiprio queue)"),
     Prop("queue-size", PropType.UINT16, DEFAULT_QUEUE_SIZE, "entries per queue")),
    "a host directory served by a vhost-user back end (virtiofsd)")]
