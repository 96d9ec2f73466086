"""i8042 controller and keyboard, driven as Linux's i8042/atkbd drivers do at boot."""

from __future__ import annotations

from pyvmm.devices.i8042 import I8042
from pyvmm.irq import IrqLine
from pyvmm.runstate import RequestKind, VmControl
from support.recording import RecordingSink

OBF, SYS, AUX_OBF = 0x01, 0x04, 0x20


def make() -> tuple[I8042, RecordingSink, VmControl]:
    sink = RecordingSink()
    control = VmControl()
    return I8042(control, IrqLine(sink, 1), IrqLine(sink, 12)), sink, control


def status(k: I8042) -> int:
    return k.cmd_port.io_read(0, 1)


def command(k: I8042, cmd: int, data: int | None = None) -> None:
    assert status(k) & 0x02 == 0  # IBF always clear: the guest may write at once
    k.cmd_port.io_write(0, 1, cmd)
    if data is not None:
        k.data_port.io_write(0, 1, data)


def read_all(k: I8042) -> list[tuple[int, bool]]:
    """Drain the output buffer: (byte, came-from-aux) pairs, as i8042_flush does."""
    out = []
    for _ in range(64):
        st = status(k)
        if not st & OBF:
            break
        out.append((k.data_port.io_read(0, 1), bool(st & AUX_OBF)))
    return out


def test_controller_probe_sequence():
    k, sink, _ = make()
    assert read_all(k) == []
    command(k, 0xAA)
    assert read_all(k) == [(0x55, False)]
    assert status(k) & SYS
    command(k, 0x20)
    ctr = read_all(k)[0][0]
    assert ctr & 0x40  # translation on, as firmware leaves it
    # Linux: disable both ports' interrupts, then write the command byte back.
    command(k, 0x60, ctr & ~0x03)
    edges = sink.rising_edges(1)
    command(k, 0x20)
    assert read_all(k) == [(ctr & ~0x03, False)]
    command(k, 0xAB)
    assert read_all(k) == [(0x00, False)]
    command(k, 0xA9)
    assert read_all(k) == [(0x00, False)]
    # Command replies with interrupts disabled never raise IRQ1.
    assert sink.rising_edges(1) == edges


def test_aux_loopback_and_port_disable_bits():
    k, sink, _ = make()
    command(k, 0xD3, 0x5A)
    assert read_all(k) == [(0x5A, True)]  # comes back as AUX data
    assert sink.rising_edges(12) == 1 and sink.levels[12] is False
    command(k, 0xA7)
    command(k, 0x20)
    assert read_all(k)[0][0] & 0x20
    command(k, 0xA8)
    command(k, 0x20)
    assert not read_all(k)[0][0] & 0x20
    # There is no mouse: a byte for it is answered with 0xFE on the AUX side.
    command(k, 0xD4, 0xFF)
    assert read_all(k) == [(0xFE, True)]
    command(k, 0xAD)
    command(k, 0x20)
    assert read_all(k)[0][0] & 0x10
    command(k, 0xAE)
    command(k, 0x20)
    assert not read_all(k)[0][0] & 0x10


def test_keyboard_commands():
    k, sink, _ = make()
    k.data_port.io_write(0, 1, 0xFF)
    assert [b for b, _ in read_all(k)] == [0xFA, 0xAA]
    k.data_port.io_write(0, 1, 0xF2)
    assert [b for b, _ in read_all(k)] == [0xFA, 0xAB, 0x41]  # translated ID
    command(k, 0x60, 0x01)  # translation off, kbd interrupt on
    k.data_port.io_write(0, 1, 0xF2)
    assert [b for b, _ in read_all(k)] == [0xFA, 0xAB, 0x83]
    for cmd in (0xF4, 0xF5, 0xF6, 0xF4):
        k.data_port.io_write(0, 1, cmd)
        assert [b for b, _ in read_all(k)] == [0xFA]
    k.data_port.io_write(0, 1, 0xED)
    k.data_port.io_write(0, 1, 0x07)
    assert [b for b, _ in read_all(k)] == [0xFA, 0xFA]
    assert k.kbd_leds == 7
    k.data_port.io_write(0, 1, 0xF0)
    k.data_port.io_write(0, 1, 0x00)
    assert [b for b, _ in read_all(k)] == [0xFA, 0xFA, 0x02]
    k.data_port.io_write(0, 1, 0xEE)
    assert [b for b, _ in read_all(k)] == [0xEE]
    k.data_port.io_write(0, 1, 0x12)  # not a command
    assert [b for b, _ in read_all(k)] == [0xFE]
    assert sink.levels[1] is False


def test_reset_via_pulse_and_output_port():
    k, _, control = make()
    command(k, 0xFE)
    req = control.wait(1.0)
    assert req is not None and req.kind is RequestKind.RESET
    command(k, 0xFF)  # pulses nothing
    assert not control.pending()
    command(k, 0xD0)
    outp = read_all(k)[0][0]
    assert outp & 0x01 and outp & 0x02
    command(k, 0xD1, outp | 0x01)
    assert not control.pending()
    command(k, 0xD1, outp & ~0x01)
    req = control.wait(1.0)
    assert req is not None and req.kind is RequestKind.RESET


def test_ctrl_alt_del_translated_set1():
    k, sink, _ = make()
    k.inject_ctrl_alt_del()
    assert sink.levels[1] is True
    got = []
    while status(k) & OBF:
        got.append(k.data_port.io_read(0, 1))
    assert got == [0x1D, 0x38, 0x53, 0x9D, 0xB8, 0xD3]
    assert sink.levels[1] is False
    # One edge per byte: Linux takes one byte per (edge-triggered) IRQ1.
    assert sink.rising_edges(1) == 6


def test_ctrl_alt_del_untranslated_set2():
    k, sink, _ = make()
    command(k, 0x60, 0x01)
    k.inject_ctrl_alt_del()
    assert [b for b, _ in read_all(k)] == [0x14, 0x11, 0x71, 0xF0, 0x14, 0xF0, 0x11, 0xF0, 0x71]


def test_keys_wait_while_keyboard_disabled_and_need_scanning():
    k, sink, _ = make()
    command(k, 0xAD)
    k.inject_ctrl_alt_del()
    assert not status(k) & OBF
    assert sink.levels.get(1, False) is False
    command(k, 0xAE)
    assert status(k) & OBF
    assert len(read_all(k)) == 6
    k.data_port.io_write(0, 1, 0xF5)  # keyboard stops scanning
    read_all(k)
    k.inject_ctrl_alt_del()
    assert read_all(k) == []


def test_reset_method():
    k, sink, _ = make()
    k.inject_ctrl_alt_del()
    k.reset()
    assert sink.levels[1] is False
    assert read_all(k) == []
