"""vhost-user front end and vhost-user-fs against a small vhost-user back end written here.

The back end is a thread on a unix socket that speaks the protocol's framing (header, payload,
SCM_RIGHTS fds), records every message and answers what a back end answers.  The device is
driven through virtio-mmio by the test driver, as Linux drives it.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from test_virtio_helpers import MmioDriver

from pyvmm.devices.virtio.device import Feature
from pyvmm.devices.virtio.mmio import VirtioMmio
from pyvmm.devices.virtio.vhost_user_fs import VhostUserFs, _create
from pyvmm.errors import ConfigError
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory, RamBackend
from pyvmm.vhost_user import protocol as p
from pyvmm.vhost_user.frontend import VhostUserFrontend
from pyvmm.vhost_user.protocol import ProtocolError, Request

FEATURES = (1 << Feature.VERSION_1) | (1 << Feature.EVENT_IDX) | (1 << Feature.INDIRECT_DESC) | \
    (1 << p.F_PROTOCOL_FEATURES) | (1 << 24)
PROTOCOL = (1 << p.ProtocolFeature.MQ) | (1 << p.ProtocolFeature.REPLY_ACK) | (1 << p.ProtocolFeature.CONFIG)


class FakeBackend:
    """Records (request, flags, payload, fds) of every message; answers like a back end."""

    def __init__(self, path: Path, *, queue_num: int = 2) -> None:
        self.path = str(path)
        self.queue_num = queue_num
        self.messages: list[tuple[int, int, bytes, list[int]]] = []
        self.refuse: dict[int, int] = {}  # request -> non-zero ack status
        self.silent: set[int] = set()  # requests never answered
        self.wrong_reply: set[int] = set()  # answered with another request's code
        self.changed = threading.Condition()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn: socket.socket) -> tuple[int, int, bytes, list[int]] | None:
        fds = array.array("i")
        head, anc, _flags, _addr = conn.recvmsg(p.HEADER.size, socket.CMSG_LEN(8 * fds.itemsize))
        if not head:
            return None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        req, flags, size = p.HEADER.unpack(head)
        payload = b""
        while len(payload) < size:
            payload += conn.recv(size - len(payload))
        return req, flags, payload, list(fds)

    def _reply(self, conn: socket.socket, req: int, body: bytes) -> None:
        if req in self.wrong_reply:
            req = Request.GET_FEATURES if req != Request.GET_FEATURES else Request.SET_OWNER
        conn.sendall(p.HEADER.pack(req, p.VERSION | p.FLAG_REPLY, len(body)) + body)

    def _serve(self) -> None:
        try:
            self._serve_one()
        except OSError:
            pass  # the test hung up

    def _serve_one(self) -> None:
        conn, _ = self.server.accept()
        self.conn = conn
        while (msg := self._recv(conn)) is not None:
            req, flags, payload, fds = msg
            with self.changed:
                self.messages.append(msg)
                self.changed.notify_all()
            if req in self.silent:
                continue
            answers = {Request.GET_FEATURES: p.U64.pack(FEATURES), Request.GET_PROTOCOL_FEATURES: p.U64.pack(PROTOCOL),
                       Request.GET_QUEUE_NUM: p.U64.pack(self.queue_num)}
            if req == Request.GET_VRING_BASE:
                answers[req] = p.VRING_STATE.pack(p.VRING_STATE.unpack(payload)[0], 7)
            if req in answers:
                self._reply(conn, req, answers[req])
            elif flags & p.FLAG_NEED_REPLY:
                self._reply(conn, req, p.U64.pack(self.refuse.get(req, 0)))

    def requests(self) -> list[int]:
        with self.changed:
            return [m[0] for m in self.messages]

    def last(self, req: int) -> tuple[int, int, bytes, list[int]]:
        with self.changed:
            return [m for m in self.messages if m[0] == req][-1]

    def wait_for(self, req: int, count: int = 1, timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: sum(m[0] == req for m in self.messages) >= count, timeout), \
                f"no {Request(req).name} after {[Request(m[0]).name for m in self.messages]}"

    def hang_up(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self.hang_up()
        self.server.close()
        for m in self.messages:
            for fd in m[3]:
                os.close(fd)


@pytest.fixture
def backend(tmp_path):
    b = FakeBackend(tmp_path / "vu.sock")
    yield b
    b.close()


@pytest.fixture
def loop():
    lp = MainLoop("test-iothread")
    lp.start_thread()
    yield lp
    lp.stop_thread()
    lp.close()


@pytest.fixture
def mem():
    m = GuestMemory(4 << 20, backend=RamBackend("mem", "memfd", 4 << 20, share=True))
    yield m
    m.close()


def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- the front end alone --------------------------------------------------------------------------------
def test_handshake_as_qemu_does_it(backend):
    fe = VhostUserFrontend(backend.path)
    fe.handshake()
    assert backend.requests() == [Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES,
                                  Request.GET_QUEUE_NUM, Request.SET_OWNER]
    _req, flags, payload, _fds = backend.last(Request.SET_PROTOCOL_FEATURES)
    assert p.U64.unpack(payload)[0] == PROTOCOL & p.FRONTEND_PROTOCOL_FEATURES  # not CONFIG: pyvmm doesn't ask
    assert flags == p.VERSION  # reply-acks start only once negotiated
    assert backend.last(Request.SET_OWNER)[1] == p.VERSION | p.FLAG_NEED_REPLY
    assert (fe.features, fe.queue_num) == (FEATURES, 2)
    fe.close()


def test_a_refused_request_fails_with_its_name(backend):
    backend.refuse[Request.SET_OWNER] = 1
    fe = VhostUserFrontend(backend.path)
    with pytest.raises(ProtocolError, match="SET_OWNER: the back end refused it"):
        fe.handshake()
    fe.close()


def test_a_silent_back_end_times_out_and_is_dead(backend):
    backend.silent.add(Request.GET_FEATURES)
    fe = VhostUserFrontend(backend.path, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="no reply within"):
        fe.handshake()
    assert time.monotonic() - start < 3
    assert fe.dead
    with pytest.raises(ProtocolError, match="gone"):
        fe.set_owner_again = fe.request(Request.SET_OWNER)  # type: ignore[attr-defined]


def test_a_reply_to_another_request_is_refused(backend):
    backend.wrong_reply.add(Request.GET_FEATURES)
    fe = VhostUserFrontend(backend.path)
    with pytest.raises(ProtocolError, match="expected GET_FEATURES"):
        fe.handshake()
    assert fe.dead


def test_no_back_end_listening(tmp_path):
    with pytest.raises(ProtocolError, match="Failed to connect"):
        VhostUserFrontend(str(tmp_path / "nobody.sock"))


def test_mem_table_passes_the_memfd_and_the_back_end_sees_guest_ram(backend, mem):
    fe = VhostUserFrontend(backend.path)
    fe.handshake()
    regions = [p.MemRegion(r.gpa, r.size, r.host_addr, r.fd_offset, r.fd) for r in mem.regions]
    fe.set_mem_table(regions)
    _req, flags, payload, fds = backend.last(Request.SET_MEM_TABLE)
    assert flags & p.FLAG_NEED_REPLY and len(fds) == 1
    n, _pad = struct.unpack_from("<II", payload)
    gpa, size, uaddr, offset = p.MEM_REGION.unpack_from(payload, 8)
    assert (n, gpa, size, uaddr, offset) == (1, 0, 4 << 20, mem.regions[0].host_addr, 0)
    view = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED, offset=offset)
    mem.write(0x2345, b"guest data")
    assert view[0x2345:0x2345 + 10] == b"guest data"
    view[0x100:0x104] = b"back"  # what virtiofsd writes, the guest reads
    assert mem.read(0x100, 4) == b"back"
    view.close()
    fe.close()


# -- the device ------------------------------------------------------------------------------------------
class Line:
    def __init__(self) -> None:
        self.level = False
        self.raised = 0

    def set_level(self, level: bool) -> None:
        self.raised += level and not self.level
        self.level = level


def _device(backend, mem, loop) -> tuple[VhostUserFs, VirtioMmio, Line]:
    fe = VhostUserFrontend(backend.path)
    fe.handshake()
    dev = VhostUserFs(mem, fe, tag="hostshare", num_request_queues=1, queue_size=16, loop=loop)
    line = Line()
    return dev, VirtioMmio(dev, line), line


def test_config_space_and_features(backend, mem, loop):
    dev, t, _line = _device(backend, mem, loop)
    cfg = bytes(dev.read_config(i, 1) for i in range(40))
    assert cfg == b"hostshare".ljust(36, b"\0") + struct.pack("<I", 1)
    assert dev.device_features == FEATURES & ((1 << 32) | (1 << 29) | (1 << 28))  # no PROTOCOL_FEATURES bit
    t.close()


def test_driver_ok_hands_the_rings_to_the_back_end(backend, mem, loop):
    dev, t, line = _device(backend, mem, loop)
    drv = MmioDriver(mem, t)
    qs = drv.init(2, size=16)
    backend.wait_for(Request.SET_VRING_ENABLE, 2)
    order = [r for r in backend.requests() if r not in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                                                        Request.SET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                                                        Request.SET_OWNER)]
    per_queue = [Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ADDR, Request.SET_VRING_KICK,
                 Request.SET_VRING_CALL, Request.SET_VRING_ERR]
    assert order == [Request.SET_FEATURES, Request.SET_MEM_TABLE, *per_queue, *per_queue,
                     Request.SET_VRING_ENABLE, Request.SET_VRING_ENABLE]
    feats = p.U64.unpack(backend.last(Request.SET_FEATURES)[2])[0]
    assert feats >> p.F_PROTOCOL_FEATURES & 1 and feats >> Feature.VERSION_1 & 1
    addrs = [p.VRING_ADDR.unpack(m[2]) for m in backend.messages if m[0] == Request.SET_VRING_ADDR]
    assert addrs[1][:5] == (1, 0, mem.host_address(qs[1].desc), mem.host_address(qs[1].used),
                            mem.host_address(qs[1].avail))
    kicks = [m[3][0] for m in backend.messages if m[0] == Request.SET_VRING_KICK]
    calls = [m[3][0] for m in backend.messages if m[0] == Request.SET_VRING_CALL]
    # a guest kick (an MMIO exit) reaches the back end's kick eventfd of that queue
    drv.kick(1)
    assert os.eventfd_read(kicks[1]) == 1
    with pytest.raises(BlockingIOError):
        os.set_blocking(kicks[0], False)
        os.eventfd_read(kicks[0])
    # the back end's call becomes the guest's interrupt (used-buffer bit)
    os.eventfd_write(calls[1], 1)
    wait_until(lambda: line.level)
    assert drv.ack_interrupt() == 1
    # a device reset stops the back end's rings
    drv.wr(0x070, 0)
    assert [p.VRING_STATE.unpack(m[2]) for m in backend.messages if m[0] == Request.GET_VRING_BASE] == [(0, 0), (1, 0)]
    disables = [p.VRING_STATE.unpack(m[2]) for m in backend.messages if m[0] == Request.SET_VRING_ENABLE]
    assert disables[-2:] == [(0, 0), (1, 0)]
    t.close()


def _fuse_request(drv: MmioDriver, q, unique: int, opcode: int = 1) -> tuple[int, int]:
    hdr = drv.alloc(64)
    out = drv.alloc(64)
    drv.mem.write(hdr, struct.pack("<IIQ", 64, opcode, unique) + bytes(48))
    return q.add([(hdr, 64, False), (out, 64, True)]), out


def test_back_end_death_is_one_line_and_eio_for_every_request(backend, mem, loop, caplog):
    dev, t, line = _device(backend, mem, loop)
    drv = MmioDriver(mem, t)
    qs = drv.init(2, size=16)
    backend.wait_for(Request.SET_VRING_ENABLE, 2)
    # one request the back end took but never answered, then it dies
    head1, out1 = _fuse_request(drv, qs[1], 0x1234)
    drv.kick(1)
    backend.hang_up()
    wait_until(lambda: dev.failing)
    wait_until(lambda: qs[1].used_idx() == 1)
    assert qs[1].get_used() == [(head1, 16)]
    assert struct.unpack("<IiQ", mem.read(out1, 16)) == (16, -5, 0x1234)
    # later requests too, and FORGET gets no reply body
    head2, out2 = _fuse_request(drv, qs[1], 0x99)
    head3, _ = _fuse_request(drv, qs[0], 0x77, opcode=2)
    drv.kick(1)
    drv.kick(0)
    wait_until(lambda: qs[1].used_idx() == 2 and qs[0].used_idx() == 1)
    assert qs[1].get_used() == [(head2, 16)] and qs[0].get_used() == [(head3, 0)]
    assert struct.unpack("<IiQ", mem.read(out2, 16)) == (16, -5, 0x99)
    assert line.raised >= 1
    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1
    # a driver reset and re-init while the back end is gone: still EIO, never a hang
    qs = drv.init(2, size=16)
    head4, out4 = _fuse_request(drv, qs[1], 0x55)
    drv.kick(1)
    wait_until(lambda: qs[1].used_idx() == 1)
    assert struct.unpack("<IiQ", mem.read(out4, 16)) == (16, -5, 0x55)
    t.close()


class _Ctx:
    def __init__(self, mem: GuestMemory, path: str, loop: MainLoop) -> None:
        self.memory, self.path, self.iothread = mem, path, loop

    def chardev_socket_path(self, ident: str) -> str:
        return self.path


class _Props:
    def __init__(self, **values) -> None:
        self.values = {"num-request-queues": 1, "queue-size": 128, **values}

    def name(self, default: str) -> str:
        return default

    def get_str(self, key: str):
        return self.values.get(key)

    def get_int(self, key: str):
        return self.values.get(key)


@pytest.mark.parametrize("props,msg", [
    ({"tag": "t"}, "^missing chardev$"),
    ({"chardev": "c"}, "^missing tag property$"),
    ({"chardev": "c", "tag": "x" * 37}, "^tag property must be 36 bytes or less$"),
    ({"chardev": "c", "tag": "t", "queue-size": 100}, "^queue-size property must be a power of 2$"),
    ({"chardev": "c", "tag": "t", "queue-size": 2048}, "^queue-size property must be 1024 or smaller$"),
    ({"chardev": "c", "tag": "t", "num-request-queues": 0}, "^num-request-queues property must be larger than 0$"),
    ({"chardev": "c", "tag": "t", "num-request-queues": 2}, "serves 2 queues, 3 are needed"),
])
def test_factory_errors(backend, mem, loop, props, msg):
    with pytest.raises(ConfigError, match=msg):
        _create(_Ctx(mem, backend.path, loop), _Props(**props))  # type: ignore[arg-type]


def test_factory_refuses_private_guest_ram(backend, loop):
    private = GuestMemory(4 << 20)
    try:
        with pytest.raises(ConfigError, match="share=on"):
            _create(_Ctx(private, backend.path, loop), _Props(chardev="c", tag="t"))  # type: ignore[arg-type]
    finally:
        private.close()


def test_a_call_reports_what_the_back_end_wrote_to_the_dma_observer(backend, mem, loop):
    """tcg must drop translated code in buffers virtiofsd filled: the used chains' writable parts."""
    dev, t, line = _device(backend, mem, loop)
    written: list[tuple[int, int]] = []
    dev.set_dma_hook(lambda gpa, length: written.append((gpa, length)))
    drv = MmioDriver(mem, t)
    qs = drv.init(2, size=16)
    backend.wait_for(Request.SET_VRING_ENABLE, 2)
    calls = [m[3][0] for m in backend.messages if m[0] == Request.SET_VRING_CALL]
    hdr = drv.alloc(64)
    head = qs[1].add([(hdr, 64, False), (0x200000, 4096, True), (0x201000, 4096, True), (0x300000, 512, True)])
    table = drv.alloc(64)
    head2 = qs[1].add_indirect(table, [(hdr, 64, False), (0x202000, 4096, True)])
    # the back end uses both chains (as virtiofsd does: used elements, then the index), then calls
    for slot, h in enumerate((head, head2)):
        mem.write(qs[1].used + 4 + 8 * slot, struct.pack("<II", h, 100))
    mem.write_u16(qs[1].used + 2, 2)
    os.eventfd_write(calls[1], 1)
    wait_until(lambda: line.level)
    assert written == [(0x200000, 3 * 4096), (0x300000, 512)]  # adjacent buffers merged, readable ones left out
    # nothing new used: a second call reports nothing more
    os.eventfd_write(calls[1], 1)
    time.sleep(0.1)
    assert len(written) == 2
    t.close()


class FakeMsiIrqFds:
    def __init__(self) -> None:
        self.routes: dict[int, tuple[int, int]] = {}
        self.log: list[tuple[str, int]] = []

    def register_msi_irqfd(self, fd: int, address: int, data: int) -> None:
        self.routes[fd] = (address, data)
        self.log.append(("register", fd))

    def unregister_msi_irqfd(self, fd: int) -> None:
        del self.routes[fd]
        self.log.append(("unregister", fd))


def test_pci_calls_follow_the_msix_vector_as_irqfds(backend, mem, loop):
    """On KVM a call eventfd becomes its queue's MSI in the kernel while the vector is usable."""
    from pyvmm.bus import Bus
    from pyvmm.devices.pci.host import PciHost
    from pyvmm.devices.virtio.pci import VirtioPci
    from support.pci_driver import GuestPci, Ring, VirtioPciDriver

    io, mmio = Bus("io"), Bus("mmio")
    msis: list[tuple[int, int]] = []
    host = PciHost(mem, mmio, io, lambda g: None, msi_sender=lambda a, d: msis.append((a, d)))
    fe = VhostUserFrontend(backend.path)
    fe.handshake()
    dev = VhostUserFs(mem, fe, tag="t", queue_size=16, loop=loop)
    t = VirtioPci(dev, msix=True, msi_sender=host.send_msi)
    slot = host.add(t)
    host.assign_resources()
    fast = FakeMsiIrqFds()
    t.attach_msi_irqfds(fast)
    assert fast.routes == {}  # MSI-X is off: calls are relayed
    pci = GuestPci(io, mmio)
    drv = VirtioPciDriver(pci, slot)
    cap = next(off for off, c in pci.caps(slot) if c == 0x11)
    pci.cfg_write(slot, cap + 2, 2, 0x8000)
    table = t.mapped_bars()[1]
    mmio.write(table + 16, 4, 0xFEE0_0000)  # vector 1
    mmio.write(table + 24, 4, 0x41)
    mmio.write(table + 28, 4, 0)
    drv.init(1 << 32)
    drv.setup_queue(1, Ring(mem, 0x10000, 16), vector=1)
    assert fast.routes == {dev.call_fds[1]: (0xFEE0_0000, 0x41)}
    mmio.write(table + 24, 4, 0x42)  # the guest moves the vector: the route follows
    assert fast.routes == {dev.call_fds[1]: (0xFEE0_0000, 0x42)}
    mmio.write(table + 28, 4, 1)  # masked: back to the relay, which leaves the MSI pending
    assert fast.routes == {} and fast.log[-1] == ("unregister", dev.call_fds[1])
    os.eventfd_write(dev.call_fds[1], 1)
    wait_until(lambda: t.msix is not None and t.msix.pending >> 1 & 1)
    assert msis == []
    mmio.write(table + 28, 4, 0)  # unmasked: the pending MSI goes out, and the irqfd is back
    assert msis == [(0xFEE0_0000, 0x42)]
    assert dev.call_fds[1] in fast.routes
    t.close()
    assert fast.routes == {}
    host.close()


def test_vm_state_is_refused_as_qemu_refuses_it(backend, mem, loop):
    from pyvmm.devices.virtio.state import save_device
    from pyvmm.vmstate import VmStateError

    dev, t, _line = _device(backend, mem, loop)
    with pytest.raises(VmStateError, match="vhost-user-fs device cannot be saved or migrated"):
        save_device(dev)
    with pytest.raises(VmStateError, match="cannot be saved"):
        t.save_state()
    t.close()
