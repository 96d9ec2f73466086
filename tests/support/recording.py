"""Test doubles that record what the code under test did: bus devices, interrupt sinks, request queues.

RecordingDevice and drain serve the unit tests that script ``kvm_run``
(tests/unit/accel) and the system tests on the real /dev/kvm
(tests/system/test_kvm_*.py); RecordingSink serves the device models' tests, CountingBackend
those that feed a character back-end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pyvmm.runstate import Request, VmControl

#: Called after each recorded write with (offset, size, value).
WriteHook = Callable[[int, int, int], object]


class RecordingDevice:
    """A bus device recording its accesses.

    Reads answer from ``values`` in order while any are left, then with ``read_value``.
    ``on_write`` (settable later, ``None`` to drop it) runs after each recorded write.
    """

    def __init__(self, read_value: int = 0, values: list[int] | None = None,
                 on_write: WriteHook | None = None) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []
        self.read_value = read_value
        self.values = list(values or [])
        self.on_write = on_write

    def io_read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.values.pop(0) if self.values else self.read_value

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))
        if self.on_write is not None:
            self.on_write(offset, size, value)


class RecordingSink:
    """An interrupt sink (what an ``IrqLine`` drives) remembering every level change, like a trace of
    KVM_IRQ_LINE calls: ``events`` in order, ``levels`` the last level per GSI.  Thread-safe."""

    def __init__(self) -> None:
        self.events: list[tuple[int, bool]] = []
        self.levels: dict[int, bool] = {}
        self.lock = threading.Lock()

    def set_irq(self, gsi: int, level: bool) -> None:
        with self.lock:
            self.events.append((gsi, level))
            self.levels[gsi] = level

    def rising_edges(self, gsi: int) -> int:
        """How many times ``gsi`` was raised."""
        with self.lock:
            return sum(1 for g, lv in self.events if g == gsi and lv)


class CountingBackend:
    """A character back-end that counts what the device writes (total, largest write) and keeps none of it."""

    label = "count"

    def __init__(self) -> None:
        self.bytes = 0
        self.largest = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        self.largest = max(self.largest, len(data))
        return len(data)

    def attach(self, receiver) -> None:
        pass

    def accept_input(self) -> None:
        pass

    def close(self) -> None:
        pass


def drain(control: VmControl) -> list[Request]:
    """Every request queued on ``control`` so far, oldest first, without waiting."""
    out = []
    while (r := control.wait(0)) is not None:
        out.append(r)
    return out
