"""QEMU's fw_cfg interface: a key/value store firmware and guests read over port I/O.

Port layout relative to the base (0x510 on a PC):

* ``+0`` selector (16-bit write): picks an item and rewinds to its start.
* ``+1`` data (byte reads): the next byte of the item; past its end reads 0.
  Writes are ignored, as in QEMU >= 2.4.
* ``+4..+11`` DMA (only when constructed with guest memory): the guest
  writes the big-endian guest-physical address of a ``FWCfgDmaAccess``
  (``be32 control, be32 length, be64 address``) -- high half at +4, low half
  at +8, which starts the transfer.  Reading there returns "QEMU CFG".
  Every guest address and length is checked with :class:`GuestMemory`; a bad
  one sets the error bit, never touches host memory outside RAM.

Named files (``add_file``) get keys from 0x20 up and are listed in the
big-endian directory at key 0x19, sorted by name as QEMU does.

Locking: several vCPUs may use the interface, and the machine adds items
from the main thread, so every entry point takes ``self._lock``.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
from collections.abc import Callable, Iterable
from enum import IntEnum, IntFlag
from typing import Any

from pyvmm.errors import ConfigError, GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.vmstate import fields

log = logging.getLogger(__name__)

FW_CFG_IO_SIZE = 2
FW_CFG_IO_SIZE_DMA = 12
DMA_OFFSET = 4
DMA_SIGNATURE = b"QEMU CFG"
FILE_NAME_MAX = 56      # including the terminating NUL
MAX_FILES = 0x1000


class FwCfgKey(IntEnum):
    SIGNATURE = 0x00
    ID = 0x01
    UUID = 0x02
    RAM_SIZE = 0x03
    NOGRAPHIC = 0x04
    NB_CPUS = 0x05
    MACHINE_ID = 0x06
    KERNEL_ADDR = 0x07
    KERNEL_SIZE = 0x08
    KERNEL_CMDLINE = 0x09
    INITRD_ADDR = 0x0A
    INITRD_SIZE = 0x0B
    BOOT_DEVICE = 0x0C
    NUMA = 0x0D
    BOOT_MENU = 0x0E
    MAX_CPUS = 0x0F
    KERNEL_ENTRY = 0x10
    KERNEL_DATA = 0x11
    INITRD_DATA = 0x12
    CMDLINE_ADDR = 0x13
    CMDLINE_SIZE = 0x14
    CMDLINE_DATA = 0x15
    SETUP_ADDR = 0x16
    SETUP_SIZE = 0x17
    SETUP_DATA = 0x18
    FILE_DIR = 0x19
    FILE_FIRST = 0x20
    WRITE_CHANNEL = 0x4000
    ARCH_LOCAL = 0x8000
    # x86 arch-local items
    ACPI_TABLES = 0x8000
    SMBIOS_ENTRIES = 0x8001
    IRQ0_OVERRIDE = 0x8002
    E820_TABLE = 0x8003
    HPET = 0x8004


class FwCfgIdFeature(IntFlag):
    TRADITIONAL = 0x01
    DMA = 0x02


class DmaControl(IntFlag):
    ERROR = 0x01
    READ = 0x02
    SKIP = 0x04
    SELECT = 0x08
    WRITE = 0x10


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


class FwCfgDmaAccess(ctypes.BigEndianStructure):
    """The guest's DMA request descriptor (big-endian, in guest memory)."""

    _pack_ = 1
    _fields_ = [("control", ctypes.c_uint32), ("length", ctypes.c_uint32), ("address", ctypes.c_uint64)]


assert ctypes.sizeof(FwCfgDmaAccess) == 16


class FwCfgFile(ctypes.BigEndianStructure):
    """One directory entry of key 0x19."""

    _pack_ = 1
    _fields_ = [("size", ctypes.c_uint32), ("select", ctypes.c_uint16), ("reserved", ctypes.c_uint16),
                ("name", ctypes.c_char * FILE_NAME_MAX)]


assert ctypes.sizeof(FwCfgFile) == 64

#: QEMU's "etc/e820" entry: le64 address, le64 length, le32 type.
_E820_ENTRY = struct.Struct("<QQI")
assert _E820_ENTRY.size == 20


def encode_e820(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """The ``etc/e820`` file body for ``(address, length, type)`` entries."""
    return b"".join(_E820_ENTRY.pack(a, n, t) for a, n, t in entries)


class FwCfg:
    """The fw_cfg device; register at 0x510 with :attr:`io_size` bytes."""

    def __init__(self, memory: GuestMemory | None = None) -> None:
        self._lock = threading.Lock()
        self._memory = memory
        self._items: dict[int, bytes] = {}
        self._files: dict[str, int] = {}  # name -> key
        self._cur_key = 0
        self._cur_data = b""
        self._cur_offset = 0
        self._dma_high = 0
        #: Called with (gpa, length) after a DMA read filled guest memory.  The machine sets it
        #: to the tcg accelerator's invalidate_code (unicorn does not see host writes); None on KVM.
        self.dma_hook: Callable[[int, int], None] | None = None
        features = FwCfgIdFeature.TRADITIONAL | (FwCfgIdFeature.DMA if memory is not None else 0)
        self._items[FwCfgKey.SIGNATURE] = b"QEMU"
        self._items[FwCfgKey.ID] = struct.pack("<I", features)
        self._items[FwCfgKey.NOGRAPHIC] = struct.pack("<H", 0)
        self._items[FwCfgKey.FILE_DIR] = struct.pack(">I", 0)
        self._select(0)

    @property
    def dma_enabled(self) -> bool:
        return self._memory is not None

    @property
    def io_size(self) -> int:
        return FW_CFG_IO_SIZE_DMA if self.dma_enabled else FW_CFG_IO_SIZE

    # -- configuration (machine setup) -------------------------------------------------------
    def add_item(self, key: int, data: bytes) -> None:
        """Set item ``key`` (replacing any earlier value)."""
        if not 0 <= key <= 0xFFFF or key & FwCfgKey.WRITE_CHANNEL or key == FwCfgKey.FILE_DIR:
            raise ConfigError(f"fw_cfg: key {key:#x} cannot be set directly")
        if FwCfgKey.FILE_FIRST <= key < FwCfgKey.FILE_FIRST + MAX_FILES:
            raise ConfigError(f"fw_cfg: key {key:#x} is in the file range; use add_file")
        with self._lock:
            self._items[key] = bytes(data)
            if key == self._cur_key:
                self._select(key)

    def add_u16(self, key: int, value: int) -> None:
        self.add_item(key, struct.pack("<H", value))

    def add_u32(self, key: int, value: int) -> None:
        self.add_item(key, struct.pack("<I", value))

    def add_u64(self, key: int, value: int) -> None:
        self.add_item(key, struct.pack("<Q", value))

    def set_cmdline(self, cmdline: str | bytes) -> None:
        """CMDLINE_SIZE/CMDLINE_DATA as QEMU sets them for -append (size includes the NUL)."""
        # surrogateescape: a command line from argv may hold bytes that are not UTF-8; pass them through as typed.
        raw = cmdline.encode("utf-8", "surrogateescape") if isinstance(cmdline, str) else bytes(cmdline)
        data = raw + b"\0"
        self.add_u32(FwCfgKey.CMDLINE_SIZE, len(data))
        self.add_item(FwCfgKey.CMDLINE_DATA, data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add (or replace) the named file; returns its selector key."""
        raw = name.encode()
        if not raw or len(raw) >= FILE_NAME_MAX or b"\0" in raw:
            raise ConfigError(f"fw_cfg: file name {name!r} must be 1..{FILE_NAME_MAX - 1} bytes")
        with self._lock:
            key = self._files.get(name)
            if key is None:
                if len(self._files) >= MAX_FILES:
                    raise ConfigError("fw_cfg: too many files")
                key = FwCfgKey.FILE_FIRST + len(self._files)
                self._files[name] = key
            self._items[key] = bytes(data)
            self._rebuild_dir()
            if self._cur_key in (key, FwCfgKey.FILE_DIR):
                self._select(self._cur_key)
            return key

    def _rebuild_dir(self) -> None:
        out = bytearray(struct.pack(">I", len(self._files)))
        for name in sorted(self._files):
            key = self._files[name]
            out += bytes(FwCfgFile(size=len(self._items[key]), select=key, reserved=0, name=name.encode()))
        self._items[FwCfgKey.FILE_DIR] = bytes(out)

    def item(self, key: int) -> bytes | None:
        with self._lock:
            return self._items.get(key)

    def reset(self) -> None:
        with self._lock:
            self._select(0)
            self._dma_high = 0

    # -- VM state (pyvmm.vmstate) -----------------------------------------------------------
    vmstate_version = 1

    def save_state(self) -> dict[str, Any]:
        """The selector, the read position and a half-written DMA address; the items themselves
        are rebuilt by the destination from the same configuration."""
        with self._lock:
            return {"key": self._cur_key, "offset": self._cur_offset, "dma_high": self._dma_high}

    def load_state(self, state: dict[str, Any], version: int) -> None:
        key = fields.need(state, "key", int, "fw_cfg")
        offset = fields.need(state, "offset", int, "fw_cfg")
        dma_high = fields.need(state, "dma_high", int, "fw_cfg")
        with self._lock:
            self._select(key)
            self._cur_offset = max(0, min(offset, len(self._cur_data)))
            self._dma_high = dma_high & 0xFFFF_FFFF

    # -- guest interface ---------------------------------------------------------------------
    def _select(self, key: int) -> None:
        self._cur_key = key & 0xFFFF
        # The write-channel bit does not change which item is read.
        self._cur_data = self._items.get(self._cur_key & ~FwCfgKey.WRITE_CHANNEL, b"")
        self._cur_offset = 0

    def _read_bytes(self, n: int) -> bytes:
        data, off = self._cur_data, self._cur_offset
        chunk = data[off:off + n]
        self._cur_offset = min(off + n, len(data))
        return chunk + bytes(n - len(chunk)) if len(chunk) < n else chunk

    def io_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 1:
                return int.from_bytes(self._read_bytes(size), "little")
            if offset == 0:
                return self._cur_key & ((1 << (8 * size)) - 1)
            if self.dma_enabled and DMA_OFFSET <= offset < DMA_OFFSET + 8:
                o = offset - DMA_OFFSET
                return int.from_bytes(DMA_SIGNATURE[o:o + size].ljust(size, b"\0"), "little")
        return (1 << (8 * size)) - 1

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == 0:
                self._select(value & 0xFFFF)
            elif offset == 1:
                pass  # data writes are ignored (QEMU >= 2.4)
            elif self.dma_enabled and offset == DMA_OFFSET and size == 8:
                self._dma(int.from_bytes(value.to_bytes(8, "little"), "big"))
            elif self.dma_enabled and offset == DMA_OFFSET and size == 4:
                self._dma_high = int.from_bytes(value.to_bytes(4, "little"), "big")
            elif self.dma_enabled and offset == DMA_OFFSET + 4 and size == 4:
                low = int.from_bytes(value.to_bytes(4, "little"), "big")
                addr, self._dma_high = (self._dma_high << 32) | low, 0
                self._dma(addr)

    # -- DMA (lock held) ---------------------------------------------------------------------
    def _dma(self, desc_addr: int) -> None:
        mem = self._memory
        assert mem is not None
        try:
            raw = mem.read(desc_addr, ctypes.sizeof(FwCfgDmaAccess))
        except GuestMemoryError:
            log.debug("fw_cfg: DMA descriptor at %#x is outside RAM", desc_addr)
            return
        desc = FwCfgDmaAccess.from_buffer_copy(raw)
        control, length, addr = desc.control, desc.length, desc.address
        if control & DmaControl.SELECT:
            self._select(control >> 16)
        status = 0
        try:
            if control & DmaControl.READ:
                if length:
                    self._dma_read(mem, addr, length)
            elif control & DmaControl.WRITE:
                status = DmaControl.ERROR  # no item is writable
            elif control & DmaControl.SKIP:
                self._cur_offset = min(self._cur_offset + length, len(self._cur_data))
        except GuestMemoryError:
            log.debug("fw_cfg: DMA to %#x+%#x is outside RAM", addr, length)
            status = DmaControl.ERROR
        try:
            mem.write(desc_addr, struct.pack(">I", status))
        except GuestMemoryError:
            pass

    def _dma_read(self, mem: GuestMemory, addr: int, length: int) -> None:
        """Copy ``length`` bytes of the current item to guest ``addr``; zeros past its end."""
        mem.region_for(addr, length)  # the whole destination must be RAM before anything is copied
        data, off = self._cur_data, self._cur_offset
        avail = max(0, min(length, len(data) - off))
        if avail:
            mem.write(addr, memoryview(data)[off:off + avail])
        if length > avail:
            mem.fill(addr + avail, length - avail, 0)  # no host buffer sized by the guest
        self._cur_offset = min(off + length, len(data))
        if self.dma_hook is not None:
            self.dma_hook(addr, length)
