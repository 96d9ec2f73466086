"""Address-space buses: the port-I/O space and the MMIO space.

A device registers one or more ranges and is called with the *offset* into
its range, never the absolute address, so it never looks past its own range.
Unassigned port reads return all-ones, as on a PC; unassigned writes are
dropped.
"""

from __future__ import annotations

import bisect
import logging
from typing import Protocol

from pyvmm.errors import ConfigError

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """Something that answers reads and writes in a registered range."""

    def io_read(self, offset: int, size: int) -> int: ...

    def io_write(self, offset: int, size: int, value: int) -> None: ...


class BusError(ConfigError):
    """A range that cannot be registered; a ConfigError so that ``--device`` mistakes are one line."""


#: The size of the x86 port-I/O space; the bus named "io" refuses ranges past it.
IO_SPACE_SIZE = 1 << 16


class Bus:
    """Maps address ranges to devices.  Lookups are a bisect over sorted range starts."""

    def __init__(self, name: str, limit: int | None = None) -> None:
        self.name = name
        #: One past the highest address a range may cover (port I/O: 64 KiB; MMIO: 2^64).
        self.limit = limit if limit is not None else (IO_SPACE_SIZE if name == "io" else 1 << 64)
        # (sorted range starts, matching (start, end, device, name) entries), replaced as ONE tuple by
        # register()/unregister() so that a vCPU thread looking up concurrently always sees a
        # consistent pair.  Public so that a vCPU loop can inline the lookup.
        self.table: tuple[list[int], list[tuple[int, int, BusDevice, str]]] = ([], [])
        self._warned: set[int] = set()

    def register(self, base: int, size: int, device: BusDevice, name: str | None = None) -> None:
        if size <= 0:
            raise BusError(f"{self.name}: empty range for {name}")
        end = base + size
        if base < 0 or end > self.limit:
            raise BusError(f"{self.name}: {name} at {base:#x}+{size:#x} is outside the bus (0-{self.limit - 1:#x})")
        for s, e, _, n in self.table[1]:
            if base < e and s < end:
                raise BusError(f"{self.name}: {name} at {base:#x}+{size:#x} overlaps {n} at {s:#x}-{e:#x}")
        starts, entries = self.table
        entries = list(entries)
        entries.insert(bisect.bisect(starts, base), (base, end, device, name or type(device).__name__))
        self.table = ([s for (s, _, _, _) in entries], entries)

    def unregister(self, device: BusDevice) -> None:
        keep = [(s, e, d, n) for (s, e, d, n) in self.table[1] if d is not device]
        self.table = ([s for (s, _, _, _) in keep], keep)

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        """The (range base, device) holding ``addr``, or None."""
        starts, entries = self.table
        i = bisect.bisect(starts, addr) - 1
        if i >= 0:
            s, e, d, _ = entries[i]
            if addr < e:
                return s, d
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self._note_unassigned(addr, size, "read")
            return (1 << (8 * size)) - 1
        base, dev = hit
        return dev.io_read(addr - base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self._note_unassigned(addr, size, "write")
            return
        base, dev = hit
        dev.io_write(addr - base, size, value & ((1 << (8 * size)) - 1))

    def _note_unassigned(self, addr: int, size: int, what: str) -> None:
        if addr not in self._warned and len(self._warned) < 64:
            self._warned.add(addr)
            log.debug("%s: unassigned %s of %d bytes at %#x", self.name, what, size, addr)

    def ranges(self) -> list[tuple[int, int, str]]:
        return [(s, e, n) for (s, e, _, n) in self.table[1]]
