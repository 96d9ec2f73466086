"""PCI configuration space: the 256-byte type-0 header, write masks, capabilities, BARs.

A :class:`ConfigSpace` is plain data plus a per-byte *write mask*: the
guest may only change bits the device declared writable, so read-only IDs,
the capability chain and reserved bits stay intact whatever the guest
writes.  Status bits that are "write 1 to clear" have their own mask.
BARs are described by :class:`BarSpec`; their registers are handled by
:class:`~pyvmm.devices.pci.host.PciDevice`, since sizing (writing all-ones)
and moving them has side effects on the machine's buses.

Every offset/size coming from the guest is checked here: accesses must be
1, 2 or 4 bytes, naturally aligned and inside the 256 bytes; anything else
reads as all-ones and writes are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

CONFIG_SIZE = 256
HEADER_SIZE = 0x40
CAP_START = 0x40  # first byte a capability may use (after the type-0 header)


class Reg(IntEnum):
    """Type-0 header registers (byte offsets)."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION = 0x08
    PROG_IF = 0x09
    SUBCLASS = 0x0A
    CLASS = 0x0B
    CACHE_LINE = 0x0C
    LATENCY = 0x0D
    HEADER_TYPE = 0x0E
    BAR0 = 0x10
    SUBSYS_VENDOR_ID = 0x2C
    SUBSYS_ID = 0x2E
    ROM_BASE = 0x30
    CAP_PTR = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    INTX_DISABLE = 1 << 10


class StatusBits(IntFlag):
    INTERRUPT = 1 << 3
    CAP_LIST = 1 << 4


class CapId(IntEnum):
    MSI = 0x05
    VENDOR = 0x09
    MSIX = 0x11


class BarKind(IntEnum):
    IO = 0
    MEM32 = 1
    MEM64 = 2


NUM_BARS = 6
#: Writable command bits for an endpoint (I/O, memory, bus master, INTx disable).
COMMAND_WMASK = int(Command.IO | Command.MEMORY | Command.BUS_MASTER | Command.INTX_DISABLE)


@dataclass(frozen=True)
class BarSpec:
    """One BAR: its index (0-5), size (a power of two), kind and prefetchability."""

    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    def __post_init__(self) -> None:
        minimum = 4 if self.kind is BarKind.IO else 16
        if not 0 <= self.index < NUM_BARS or (self.kind is BarKind.MEM64 and self.index == NUM_BARS - 1):
            raise ValueError(f"BAR index {self.index} invalid for a {self.kind.name} BAR")
        if self.size < minimum or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} must be a power of two >= {minimum}")
        if self.kind is BarKind.IO and self.size > 256:
            raise ValueError("I/O BARs are at most 256 bytes")
        if self.kind is BarKind.MEM32 and self.size > (1 << 31):
            raise ValueError("32-bit BARs are at most 2 GiB")

    @property
    def flag_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.kind is BarKind.IO:
            return 0x1
        bits = 0x4 if self.kind is BarKind.MEM64 else 0x0
        return bits | (0x8 if self.prefetchable else 0)

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO


def access_ok(offset: int, size: int, limit: int = CONFIG_SIZE) -> bool:
    """A 1/2/4-byte naturally aligned access inside ``limit`` bytes."""
    return size in (1, 2, 4) and offset >= 0 and offset % size == 0 and offset + size <= limit


class ConfigSpace:
    """256 bytes of configuration space with per-byte write and write-1-to-clear masks."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self._cap_end = CAP_START
        self._last_cap = -1

    # -- device-side setters (no masks applied) ---------------------------------------------------
    def set_u8(self, offset: int, value: int) -> None:
        self.data[offset] = value & 0xFF

    def set_u16(self, offset: int, value: int) -> None:
        self.data[offset:offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def set_u32(self, offset: int, value: int) -> None:
        self.data[offset:offset + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_w1c(self, offset: int, size: int, mask: int) -> None:
        self.w1cmask[offset:offset + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    # -- header helpers -----------------------------------------------------------------------------
    def init_header(self, *, vendor: int, device: int, class_code: int, revision: int = 0,
                    subsys_vendor: int = 0, subsys_id: int = 0, interrupt_pin: int = 0,
                    multifunction: bool = False) -> None:
        """Fill a type-0 header; ``class_code`` is the 24-bit class/subclass/prog-if."""
        self.set_u16(Reg.VENDOR_ID, vendor)
        self.set_u16(Reg.DEVICE_ID, device)
        self.set_u8(Reg.REVISION, revision)
        self.set_u8(Reg.PROG_IF, class_code & 0xFF)
        self.set_u8(Reg.SUBCLASS, (class_code >> 8) & 0xFF)
        self.set_u8(Reg.CLASS, (class_code >> 16) & 0xFF)
        self.set_u8(Reg.HEADER_TYPE, 0x80 if multifunction else 0x00)
        self.set_u16(Reg.SUBSYS_VENDOR_ID, subsys_vendor)
        self.set_u16(Reg.SUBSYS_ID, subsys_id)
        self.set_u8(Reg.INTERRUPT_PIN, interrupt_pin)
        self.set_writable(Reg.COMMAND, 2, COMMAND_WMASK)
        self.set_writable(Reg.CACHE_LINE, 1, 0xFF)
        self.set_writable(Reg.LATENCY, 1, 0xFF)
        self.set_writable(Reg.INTERRUPT_LINE, 1, 0xFF)

    # -- capabilities ---------------------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"") -> int:
        """Append a capability (``body`` excludes the 2-byte id/next header); returns its offset.

        ``wmask`` gives the guest-writable bits of ``body`` (missing bytes are read-only).
        """
        length = 2 + len(body)
        offset = (self._cap_end + 3) & ~3
        if offset + length > CONFIG_SIZE:
            raise ValueError("configuration space is full")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2:offset + length] = body
        self.wmask[offset + 2:offset + 2 + len(wmask)] = wmask[:len(body)]
        if self._last_cap < 0:
            self.set_u8(Reg.CAP_PTR, offset)
            self.set_u16(Reg.STATUS, self.get(Reg.STATUS, 2) | StatusBits.CAP_LIST)
        else:
            self.data[self._last_cap + 1] = offset
        self._last_cap = offset
        self._cap_end = offset + length
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) for each capability in chain order (bounded walk)."""
        out: list[tuple[int, int]] = []
        ptr = self.data[Reg.CAP_PTR] if self.get(Reg.STATUS, 2) & StatusBits.CAP_LIST else 0
        while ptr and len(out) < 48:
            out.append((ptr, self.data[ptr]))
            ptr = self.data[ptr + 1]
        return out

    # -- guest accesses ----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if not access_ok(offset, size):
            return (1 << (8 * size)) - 1 if 0 < size <= 8 else 0
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Apply a guest write through the write and W1C masks (checked offset/size)."""
        if not access_ok(offset, size):
            return
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            o = offset + i
            wm = self.wmask[o]
            w1c = self.w1cmask[o]
            cur = self.data[o]
            cur = (cur & ~wm) | (b & wm)
            cur &= ~(b & w1c)
            self.data[o] = cur & 0xFF
