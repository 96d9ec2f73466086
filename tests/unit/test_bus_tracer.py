"""Bus.set_tracer sees reads and writes with their values, also through the inlined table lookup."""

from __future__ import annotations

from bisect import bisect_right

from pyvmm.bus import Bus


class Reg:
    def __init__(self) -> None:
        self.value = 0

    def io_read(self, offset: int, size: int) -> int:
        return self.value + offset

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.value = value


def test_tracer_sees_values_and_can_be_removed() -> None:
    bus = Bus("io")
    reg = Reg()
    bus.register(0x100, 4, reg, "reg")
    seen: list[tuple[str, str, int, int, int]] = []
    bus.set_tracer(lambda *a: seen.append(a))
    bus.write(0x101, 1, 0x41)
    assert bus.read(0x102, 2) == 0x43
    # an accelerator's inlined lookup (kvm_vcpu.py) finds the traced device too
    s, _e, dev, _ = (t := bus.table)[1][bisect_right(t[0], 0x100) - 1]
    dev.io_write(0x100 - s, 1, 7)
    bus.read(0x300, 1)  # unassigned
    late = Reg()
    bus.register(0x200, 1, late, "late")
    bus.write(0x200, 1, 9)
    assert seen == [("io", "write", 0x101, 1, 0x41), ("io", "read", 0x102, 2, 0x43), ("io", "write", 0x100, 1, 7),
                    ("io", "read", 0x300, 1, 0xFF), ("io", "write", 0x200, 1, 9)]
    bus.unregister(late)
    assert [n for *_, n in bus.ranges()] == ["reg"]
    bus.set_tracer(None)
    bus.write(0x100, 1, 1)
    assert len(seen) == 5 and reg.value == 1
