"""isa-debug-exit status mapping and the port-0x80 POST-code sink."""

from __future__ import annotations

from pyvmm.bus import Bus
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.port80 import Port80
from pyvmm.runstate import RequestKind, VmControl


def test_debug_exit_status_through_the_bus():
    control = VmControl()
    bus = Bus("io")
    bus.register(0xF4, 4, DebugExit(control), "isa-debug-exit")
    bus.write(0xF4, 1, 0x10)
    req = control.wait(1.0)
    assert req is not None and req.kind is RequestKind.EXIT and req.status == 0x21
    bus.write(0xF4, 4, 0)
    assert control.wait(1.0).status == 1
    bus.write(0xF6, 2, 0x7F)  # any offset in the range
    assert control.wait(1.0).status == 0xFF
    assert bus.read(0xF4, 1) == 0


def test_port80_remembers_codes():
    p = Port80(log_writes=True)
    bus = Bus("io")
    bus.register(0x80, 1, p, "port80")
    assert p.last_code is None
    bus.write(0x80, 1, 0xAB)
    bus.write(0x80, 1, 0x42)
    assert p.last_code == 0x42 and p.writes == 2
    assert bus.read(0x80, 1) == 0
    p.reset()
    assert p.last_code is None
