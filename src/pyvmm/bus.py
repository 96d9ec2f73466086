"""Address-space buses: the port-I/O space and the MMIO space.

A device registers one or more ranges and is called with the *offset* into
its range, never the absolute address, so it never looks past its own range.
Unassigned port reads return all-ones, as on a PC; unassigned writes are
dropped.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import Protocol

from pyvmm.errors import ConfigError

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """Something that answers reads and writes in a registered range."""

    def io_read(self, offset: int, size: int) -> int: ...

    def io_write(self, offset: int, size: int, value: int) -> None: ...


class BusError(ConfigError):
    """A range that cannot be registered; a ConfigError so that ``--device`` mistakes are one line."""


#: ``tracer(bus_name, "read"|"write", address, size, value)``, called after each access.
Tracer = Callable[[str, str, int, int, int], None]


class _Traced:
    """A device seen through a tracer: the same answers, each access reported with its value."""

    def __init__(self, inner: BusDevice, bus: str, base: int, tracer: Tracer) -> None:
        self.inner = inner
        self._bus, self._base, self._tracer = bus, base, tracer

    def io_read(self, offset: int, size: int) -> int:
        value = self.inner.io_read(offset, size)
        self._tracer(self._bus, "read", self._base + offset, size, value & ((1 << (8 * size)) - 1))
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.inner.io_write(offset, size, value)
        self._tracer(self._bus, "write", self._base + offset, size, value)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def _untraced(device: BusDevice) -> BusDevice:
    return device.inner if isinstance(device, _Traced) else device


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
        self.tracer: Tracer | None = None

    def set_tracer(self, tracer: Tracer | None) -> None:
        """Observe every access that reaches a device on this bus (port-I/O or MMIO exits), with its value.

        For research and teaching (examples/exit_tracer.py).  Devices are wrapped in the lookup
        table itself, so the accelerators' inlined lookups see the tracer too, and a bus with no
        tracer costs nothing.  Accesses served without an exit (ioeventfd kicks) are not seen.
        ``None`` removes it.
        """
        self.tracer = tracer
        entries = [(s, e, _untraced(d), n) for (s, e, d, n) in self.table[1]]
        if tracer is not None:
            entries = [(s, e, _Traced(d, self.name, s, tracer), n) for (s, e, d, n) in entries]
        self.table = ([s for (s, _, _, _) in entries], entries)

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
        if self.tracer is not None:
            device = _Traced(device, self.name, base, self.tracer)
        entries.insert(bisect.bisect(starts, base), (base, end, device, name or type(device).__name__))
        self.table = ([s for (s, _, _, _) in entries], entries)

    def unregister(self, device: BusDevice) -> None:
        keep = [(s, e, d, n) for (s, e, d, n) in self.table[1] if _untraced(d) is not device]
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
        if self.tracer is not None:
            self.tracer(self.name, what, addr, size, (1 << (8 * size)) - 1 if what == "read" else 0)
        if addr not in self._warned and len(self._warned) < 64:
            self._warned.add(addr)
            log.debug("%s: unassigned %s of %d bytes at %#x", self.name, what, size, addr)

    def ranges(self) -> list[tuple[int, int, str]]:
        return [(s, e, n) for (s, e, _, n) in self.table[1]]
