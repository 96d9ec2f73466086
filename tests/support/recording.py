"""Bus devices and request queues for the accelerator tests: what the guest did, recorded.

Used by the unit tests that script ``kvm_run`` (tests/unit/accel) and by the
system tests on the real /dev/kvm (tests/system/test_kvm_*.py).
"""

from __future__ import annotations

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


def drain(control: VmControl) -> list[Request]:
    """Every request queued on ``control`` so far, oldest first, without waiting."""
    out = []
    while (r := control.wait(0)) is not None:
        out.append(r)
    return out
