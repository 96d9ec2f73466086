"""A vhost-user back end that runs one virtqueue, for tests on real KVM.

It does what virtiofsd's vhost-user layer does and nothing of FUSE: the handshake, maps guest RAM
from SET_MEM_TABLE's file descriptors, and on each kick of queue 0 fills every available
device-writable buffer with random bytes, puts it on the used ring and signals the call eventfd.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct
import threading

from pyvmm.vhost_user import protocol as p
from pyvmm.vhost_user.protocol import Request

FEATURES = (1 << 32) | (1 << p.F_PROTOCOL_FEATURES)
PROTOCOL = (1 << p.ProtocolFeature.MQ) | (1 << p.ProtocolFeature.REPLY_ACK)


class RingBackend:
    def __init__(self, path: str, queues: int = 2) -> None:
        self.path, self.queues = path, queues
        self.regions: list[tuple[int, int, mmap.mmap]] = []  # (front-end address, size, mapping)
        self.gpas: list[tuple[int, int]] = []  # (guest-physical address, size) of each region
        self.rings: dict[int, dict[str, int]] = {}
        self.kicks = 0
        self.served = 0
        self.requests: list[int] = []
        self.error = ""
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    # -- guest RAM through the front end's addresses --------------------------------------------------
    def _at(self, uaddr: int, length: int) -> tuple[mmap.mmap, int]:
        for base, size, m in self.regions:
            if base <= uaddr and uaddr + length <= base + size:
                return m, uaddr - base
        raise ValueError(f"address {uaddr:#x} is not in the memory table")

    def _gpa(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        for (_base, size, m), (g, _s) in zip(self.regions, self.gpas, strict=True):
            if g <= gpa and gpa + length <= g + size:
                return m, gpa - g
        raise ValueError(f"guest address {gpa:#x} is not in the memory table")

    def _serve_queue(self, q: int) -> None:
        r = self.rings[q]
        n = r["num"]
        am, ao = self._at(r["avail"], 4 + 2 * n)
        um, uo = self._at(r["used"], 4 + 8 * n)
        dm, do = self._at(r["desc"], 16 * n)
        avail = struct.unpack_from("<H", am, ao + 2)[0]
        used = struct.unpack_from("<H", um, uo + 2)[0]
        while r["last"] != avail:
            head = struct.unpack_from("<H", am, ao + 4 + 2 * (r["last"] % n))[0]
            addr, length, flags, _nxt = struct.unpack_from("<QIHH", dm, do + 16 * head)
            written = 0
            if flags & 2:
                bm, bo = self._gpa(addr, length)
                bm[bo:bo + length] = os.urandom(length)
                written = length
            struct.pack_into("<II", um, uo + 4 + 8 * (used % n), head, written)
            used = (used + 1) & 0xFFFF
            struct.pack_into("<H", um, uo + 2, used)
            r["last"] = (r["last"] + 1) & 0xFFFF
            self.served += 1
        os.eventfd_write(r["call"], 1)

    # -- the protocol ----------------------------------------------------------------------------------
    def _recv(self, conn: socket.socket) -> tuple[int, int, bytes, list[int]] | None:
        fds = array.array("i")
        head, anc, _f, _a = conn.recvmsg(p.HEADER.size, socket.CMSG_LEN(8 * fds.itemsize))
        if not head:
            return None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        req, flags, size = p.HEADER.unpack(head)
        body = b""
        while len(body) < size:
            body += conn.recv(size - len(body))
        return req, flags, body, list(fds)

    def _handle(self, conn: socket.socket, req: int, flags: int, body: bytes, fds: list[int]) -> None:
        reply: bytes | None = None
        if req == Request.GET_FEATURES:
            reply = p.U64.pack(FEATURES)
        elif req == Request.GET_PROTOCOL_FEATURES:
            reply = p.U64.pack(PROTOCOL)
        elif req == Request.GET_QUEUE_NUM:
            reply = p.U64.pack(self.queues)
        elif req == Request.SET_MEM_TABLE:
            n = struct.unpack_from("<I", body)[0]
            self.regions, self.gpas = [], []
            for i in range(n):
                gpa, size, uaddr, off = p.MEM_REGION.unpack_from(body, 8 + 32 * i)
                self.regions.append((uaddr, size, mmap.mmap(fds[i], size, flags=mmap.MAP_SHARED, offset=off)))
                self.gpas.append((gpa, size))
        elif req in (Request.SET_VRING_NUM, Request.SET_VRING_BASE):
            idx, num = p.VRING_STATE.unpack(body)
            self.rings.setdefault(idx, {})["num" if req == Request.SET_VRING_NUM else "last"] = num
        elif req == Request.SET_VRING_ADDR:
            idx, _fl, desc, used, avail, _log = p.VRING_ADDR.unpack(body)
            self.rings.setdefault(idx, {}).update(desc=desc, used=used, avail=avail)
        elif req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL):
            idx = p.U64.unpack(body)[0] & 0xFF
            self.rings.setdefault(idx, {})["kick" if req == Request.SET_VRING_KICK else "call"] = fds[0]
        elif req == Request.GET_VRING_BASE:
            idx = p.VRING_STATE.unpack(body)[0]
            reply = p.VRING_STATE.pack(idx, self.rings.get(idx, {}).get("last", 0))
        if reply is None and flags & p.FLAG_NEED_REPLY:
            reply = p.U64.pack(0)
        if reply is not None:
            conn.sendall(p.HEADER.pack(req, p.VERSION | p.FLAG_REPLY, len(reply)) + reply)

    def _run(self) -> None:
        try:
            conn, _ = self.server.accept()
            poller = select.poll()
            poller.register(conn, select.POLLIN)
            kick_fds: dict[int, int] = {}
            while True:
                for q, r in self.rings.items():
                    if "kick" in r and r["kick"] not in kick_fds:
                        kick_fds[r["kick"]] = q
                        poller.register(r["kick"], select.POLLIN)
                for fd, _ev in poller.poll(100):
                    if fd in kick_fds:
                        os.eventfd_read(fd)
                        self.kicks += 1
                        self._serve_queue(kick_fds[fd])
                        continue
                    msg = self._recv(conn)
                    if msg is None:
                        return
                    self.requests.append(msg[0])
                    self._handle(conn, *msg)
        except Exception as e:  # reported by the test
            self.error = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        self.server.close()
