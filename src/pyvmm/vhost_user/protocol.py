"""The vhost-user wire format (QEMU's docs/interop/vhost-user.rst), front-end side.

Every message is a 12-byte header ``u32 request, u32 flags, u32 size`` and ``size`` bytes
of payload, all little-endian; file descriptors ride along as ``SCM_RIGHTS`` on the same
``sendmsg``.  The flags carry the protocol version (1) in bits 0-1, ``REPLY`` (bit 2) on the
back end's answers and ``NEED_REPLY`` (bit 3) when the front end asks for a reply-ack.

This module only packs and unpacks; :mod:`pyvmm.vhost_user.frontend` owns the socket.
Nothing the back end sends is trusted: replies are checked for request, flags and size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct("<III")
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
#: The largest payload the front end reads back (GET_CONFIG's 256 bytes plus its header is the
#: biggest reply it asks for); a back end that announces more is broken.
MAX_REPLY_PAYLOAD = 4096
#: VHOST_MEMORY_BASELINE_NREGIONS: what SET_MEM_TABLE can carry (and fds in one message).
MAX_MEM_REGIONS = 8

#: The virtio feature bit a back end sets when it speaks GET/SET_PROTOCOL_FEATURES.
F_PROTOCOL_FEATURES = 30
#: SET_VRING_KICK/CALL/ERR: payload bit 8 says "no file descriptor" (poll instead).
VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF


class Request(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_MAX_MEM_SLOTS = 36


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


#: What pyvmm's front end speaks: several queues and reply-acks.  Nothing that needs the back-end
#: channel (BACKEND_REQ: DAX windows, IOTLB) or dirty logging (migration).
FRONTEND_PROTOCOL_FEATURES = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (front-end addresses)
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset


class ProtocolError(Exception):
    """The back end broke the protocol, refused a request, or went away."""


@dataclass(frozen=True)
class MemRegion:
    """One SET_MEM_TABLE entry: guest RAM at ``gpa`` is ``size`` bytes of ``fd`` from ``mmap_offset``,
    mapped in the front end at ``host_addr``."""

    gpa: int
    size: int
    host_addr: int
    mmap_offset: int
    fd: int


def header(request: int, size: int, need_reply: bool = False) -> bytes:
    return HEADER.pack(request, VERSION | (FLAG_NEED_REPLY if need_reply else 0), size)


def mem_table(regions: list[MemRegion]) -> bytes:
    if not 1 <= len(regions) <= MAX_MEM_REGIONS:
        raise ValueError(f"SET_MEM_TABLE carries 1 to {MAX_MEM_REGIONS} regions, not {len(regions)}")
    body = struct.pack("<II", len(regions), 0)
    return body + b"".join(MEM_REGION.pack(r.gpa, r.size, r.host_addr, r.mmap_offset) for r in regions)


def vring_fd_payload(index: int, has_fd: bool) -> bytes:
    if not 0 <= index <= VRING_IDX_MASK:
        raise ValueError(f"vring index {index} does not fit the 8-bit field")
    return U64.pack(index | (0 if has_fd else VRING_NOFD_MASK))


def check_reply(request: int, raw_header: bytes) -> int:
    """Validate a reply header to ``request``; returns its payload size."""
    if len(raw_header) != HEADER.size:
        raise ProtocolError("the back end closed the connection")
    got, flags, size = HEADER.unpack(raw_header)
    if got != request:
        raise ProtocolError(f"reply to request {got}, expected {Request(request).name}")
    if flags & VERSION_MASK != VERSION or not flags & FLAG_REPLY:
        raise ProtocolError(f"reply to {Request(request).name} has flags {flags:#x} (no version 1 reply)")
    if size > MAX_REPLY_PAYLOAD:
        raise ProtocolError(f"reply to {Request(request).name} announces {size} bytes")
    return size


__all__ = ["F_PROTOCOL_FEATURES", "FLAG_NEED_REPLY", "FLAG_REPLY", "FRONTEND_PROTOCOL_FEATURES", "HEADER",
           "MAX_MEM_REGIONS", "MEM_REGION", "MemRegion", "ProtocolError", "ProtocolFeature", "Request", "U64",
           "VERSION", "VRING_ADDR", "VRING_STATE", "check_reply", "header", "mem_table", "vring_fd_payload"]
