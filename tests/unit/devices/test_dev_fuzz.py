"""Property tests: random guest register traffic never crashes a device or breaks its invariants."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.rtc import Rtc
from pyvmm.devices.serial import Serial
from pyvmm.irq import IrqLine
from pyvmm.memory import GuestMemory
from pyvmm.runstate import VmControl
from support.recording import CountingBackend


class Sink:
    def __init__(self) -> None:
        self.levels: dict[int, bool] = {}

    def set_irq(self, gsi: int, level: bool) -> None:
        self.levels[gsi] = level


port_op = st.tuples(st.sampled_from(["r", "w", "rx"]), st.integers(0, 7), st.integers(0, 255))


@settings(max_examples=300, deadline=None)
@given(st.lists(port_op, max_size=60))
def test_serial_irq_line_always_matches_pending_state(ops):
    sink = Sink()
    u = Serial(IrqLine(sink, 4), CountingBackend())
    for kind, off, val in ops:
        if kind == "r":
            assert 0 <= u.io_read(off, 1) <= 0xFF
        elif kind == "w":
            u.io_write(off, 1, val)
        else:
            n = min(u.can_receive(), val % 5)
            u.receive(bytes(n))
        assert u.rx_count() <= 16
        assert sink.levels.get(4, False) == (u._pending_iir() != 0x01)
        assert u.io_read(5, 1) & 0x60 == 0x60  # transmitter always idle


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["data", "cmd", "rd", "st", "cad"]), st.integers(0, 255)),
                max_size=60))
def test_i8042_random_traffic(ops):
    sink = Sink()
    k = I8042(VmControl(), IrqLine(sink, 1), IrqLine(sink, 12))
    for kind, val in ops:
        if kind == "data":
            k.data_port.io_write(0, 1, val)
        elif kind == "cmd":
            k.cmd_port.io_write(0, 1, val)
        elif kind == "rd":
            assert 0 <= k.data_port.io_read(0, 1) <= 0xFF
        elif kind == "cad":
            k.inject_ctrl_alt_del()
        st_ = k.cmd_port.io_read(0, 1)
        assert not st_ & 0x02  # input buffer never reported full
        kbd, aux = k.irq_levels
        assert not (kbd and aux)
        assert sink.levels.get(1, False) == kbd and sink.levels.get(12, False) == aux
        if kbd or aux:
            assert st_ & 0x01


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 255)), max_size=80))
def test_rtc_random_traffic(ops):
    r = Rtc(64 << 20, clock=lambda: 1_700_000_000.5)
    for off, val in ops:
        r.io_write(off, 1, val)
        assert 0 <= r.io_read(1, 1) <= 0xFF


MEM = GuestMemory(1 << 20)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1),
       st.sampled_from([0, 0x1000, 0xFFFF8, 0xFFFFF, 1 << 20, 1 << 40]))
def test_fw_cfg_dma_random_descriptors(control, length, address, desc):
    fw = FwCfg(memory=MEM)
    fw.add_file("etc/x", b"data" * 10)
    if MEM.contains(desc, 16):
        MEM.write(desc, struct.pack(">IIQ", control, length, address))
    fw.io_write(4, 8, int.from_bytes(desc.to_bytes(8, "big"), "little"))
    if MEM.contains(desc, 16):
        status = struct.unpack(">I", MEM.read(desc, 4))[0]
        assert status in (0, 1)
        if not MEM.contains(address, length) and length and control & 0x02:
            assert status == 1
