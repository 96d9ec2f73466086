"""The VM state stream: codec, records, field loading, RAM passes and device round trips."""

from __future__ import annotations

import io
import random
from collections import deque

import pytest

from pyvmm.memory import GuestMemory
from pyvmm.vmstate import VmStateError, codec, fields
from pyvmm.vmstate import stream as vs
from pyvmm.vmstate.ram import PAGE, RamSender, load_pages, load_zero

VALUES = [None, True, False, 0, -1, 255, 1 << 80, -(1 << 70), 1.5, "", "text é", b"", b"\x00\xff" * 10,
          [1, [2, [3]]], {"a": 1, 2: b"x", "n": None}, {"nested": {"list": [{"k": "v"}]}}]


@pytest.mark.parametrize("value", VALUES)
def test_codec_round_trip(value) -> None:
    assert codec.decode(codec.encode(value)) == value


def test_codec_refuses_objects_and_deep_nesting() -> None:
    with pytest.raises(VmStateError):
        codec.encode(object())
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(VmStateError):
        codec.encode(deep)


def test_codec_garbage_only_raises_vmstate_errors() -> None:
    rng = random.Random(13)
    good = codec.encode({"k": [1, 2, b"abc", "s", {"x": None}]})
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[:rng.randint(0, len(data))]
        try:
            codec.decode(bytes(data))
        except VmStateError:
            pass


def test_codec_huge_length_does_not_allocate() -> None:
    with pytest.raises(VmStateError, match="runs past"):
        codec.decode(b"l" + (0xFFFFFFF0).to_bytes(4, "little"))


def _stream(*records: tuple[bytes, bytes]) -> bytes:
    buf = io.BytesIO()
    w = vs.StreamWriter(buf)
    w.header({"ram": 1})
    for kind, payload in records:
        w.record(kind, payload)
    w.end()
    return buf.getvalue()


def test_stream_round_trip_and_checks() -> None:
    data = _stream((vs.ZERO, (0).to_bytes(8, "little") + (4096).to_bytes(8, "little")))
    r = vs.StreamReader(io.BytesIO(data))
    kind, payload = r.record()
    assert kind == vs.HEADER and vs.parse_header(payload)["machine"] == {"ram": 1}
    assert r.record()[0] == vs.ZERO
    assert r.record()[0] == vs.END

    with pytest.raises(VmStateError, match="truncated"):
        r = vs.StreamReader(io.BytesIO(data[:-3]))
        while r.record()[0] != vs.END:
            pass
    bad = bytearray(data)
    bad[20] ^= 1
    with pytest.raises(VmStateError, match="checksum|corrupt"):
        r = vs.StreamReader(io.BytesIO(bytes(bad)))
        while r.record()[0] != vs.END:
            pass
    with pytest.raises(VmStateError, match="bad magic"):
        vs.StreamReader(io.BytesIO(b"QEVM" + data[4:]))
    with pytest.raises(VmStateError, match="empty"):
        vs.StreamReader(io.BytesIO(b""))
    with pytest.raises(VmStateError, match="version 7"):
        vs.StreamReader(io.BytesIO(data[:8] + (7).to_bytes(4, "little") + data[12:]))


def test_compare_machines_names_the_difference() -> None:
    vs.compare_machines({"ram": 1, "vcpus": 2}, {"ram": 1, "vcpus": 2})
    with pytest.raises(VmStateError, match="vcpus is 2 in the stream, 4 here"):
        vs.compare_machines({"ram": 1, "vcpus": 2}, {"ram": 1, "vcpus": 4})


class _Dev:
    def __init__(self) -> None:
        self.a = 1
        self.flag = False
        self.q: deque[int] = deque([1, 2])
        self.buf = bytearray(4)
        self.opt: int | None = None


def test_fields_capture_apply_and_type_checks() -> None:
    d = _Dev()
    d.a, d.flag, d.opt = 7, True, 3
    d.q.append(9)
    st = fields.capture(d, ("a", "flag", "q", "buf", "opt"))
    e = _Dev()
    fields.apply(e, ("a", "flag", "q", "buf", "opt"), codec.decode(codec.encode(st)))
    assert (e.a, e.flag, list(e.q), e.buf, e.opt) == (7, True, [1, 2, 9], bytearray(4), 3)
    assert isinstance(e.q, deque) and isinstance(e.buf, bytearray)
    with pytest.raises(VmStateError, match="lacks field 'a'"):
        fields.apply(_Dev(), ("a",), {})
    f = _Dev()
    with pytest.raises(VmStateError, match="expected int"):
        fields.apply(f, ("flag", "a"), {"flag": True, "a": "seven"})
    assert f.flag is False  # nothing set when one field is bad


def _memory() -> GuestMemory:
    return GuestMemory(1 << 20)


def _send(src: GuestMemory, track: bool = False) -> tuple[bytes, RamSender, io.BytesIO]:
    buf = io.BytesIO()
    w = vs.StreamWriter(buf)
    sender = RamSender(src, w, track=track)
    sender.full_pass()
    return buf.getvalue(), sender, buf


def _apply(dst: GuestMemory, data: bytes) -> None:
    r = vs.StreamReader(io.BytesIO(data))
    while True:
        try:
            kind, payload = r.record()
        except VmStateError:
            return  # the stream has no END here: everything before it is applied
        if kind == vs.PAGES:
            load_pages(dst, *vs.parse_pages(payload))
        elif kind == vs.ZERO:
            load_zero(dst, *vs.parse_zero(payload))


def test_ram_full_pass_sends_zero_chunks_compactly_and_restores() -> None:
    src = _memory()
    src.write(0x3000, b"hello")
    src.write(0xF_0000, b"\x01" * PAGE)
    data, sender, _ = _send(src)
    assert len(data) < 3 * 64 * 1024  # two 64 KiB data chunks, the rest as zero runs
    dst = _memory()
    dst.write(0x8_0000, b"stale")  # zero records clear what was there
    _apply(dst, data)
    assert dst.read(0, 1 << 20) == src.read(0, 1 << 20)


def test_ram_dirty_pass_sends_only_changed_pages() -> None:
    src = _memory()
    src.write(0x1_0000, b"\x02" * (64 << 10))
    data, sender, buf = _send(src, track=True)
    start = len(buf.getvalue())
    src.write(0x1_2000, b"changed")
    st = sender.dirty_pass()
    assert st.dirty_bytes == PAGE
    assert sender.dirty_pass().dirty_bytes == 0
    dst = _memory()
    _apply(dst, buf.getvalue())
    assert dst.read(0, 1 << 20) == src.read(0, 1 << 20)
    assert len(buf.getvalue()) - start < 2 * PAGE


def test_ram_records_outside_ram_are_refused() -> None:
    dst = _memory()
    with pytest.raises(VmStateError, match="outside guest RAM"):
        load_pages(dst, (1 << 20) - 2, memoryview(b"abcd"))
    with pytest.raises(VmStateError):
        load_zero(dst, 1 << 30, PAGE)
    with pytest.raises(VmStateError, match="page-aligned"):
        load_zero(dst, 100, PAGE)


def test_serial_state_round_trip() -> None:
    from pyvmm.devices.serial import Serial

    a = Serial(None, None)
    a.io_write(3, 1, 0x83)   # DLAB
    a.io_write(0, 1, 0x01)
    a.io_write(3, 1, 0x03)
    a.io_write(2, 1, 0x07)   # FIFO on
    a.receive(b"xyz")
    st = codec.decode(codec.encode(a.save_state()))
    b = Serial(None, None)
    b.load_state(st, 1)
    assert b.save_state() == a.save_state()
    assert [b.io_read(0, 1) for _ in range(3)] == list(b"xyz")
    st["_rx"] = [999]
    with pytest.raises(VmStateError):
        Serial(None, None).load_state(st, 1)


def test_irqchip_state_round_trip() -> None:
    from pyvmm.devices import irqchip_state
    from pyvmm.devices.irqchip import UserspaceIrqchip

    a = UserspaceIrqchip(2, 1_000_000_000)
    a.ioapic.write_reg(0x10 + 2 * 4, 0x31)
    a.lapics[1].write_reg(0x80, 0x20)   # TPR
    a.pic.master.imr = 0xF0
    st = codec.decode(codec.encode(irqchip_state.save(a)))
    b = UserspaceIrqchip(2, 1_000_000_000)
    irqchip_state.load(b, st)
    assert b.ioapic.redir == a.ioapic.redir and b.lapics[1].tpr == 0x20 and b.pic.master.imr == 0xF0
    with pytest.raises(VmStateError, match="local APICs"):
        irqchip_state.load(UserspaceIrqchip(1, 1_000_000_000), st)


def test_ram_dirty_pass_with_an_accelerator_log_compares_only_logged_chunks() -> None:
    src = _memory()
    data, sender, buf = _send(src, track=True)
    src.write(0x2_0000, b"logged")
    src.write(0x9_0000, b"not logged")       # a log that misses a write: that chunk is not looked at
    st = sender.dirty_pass([(0x2_0000, 6), (0x5_0000, 0x1000)])
    assert st.dirty_bytes == 64 << 10         # the whole chunk: it was all zeros before
    dst = _memory()
    _apply(dst, buf.getvalue())
    assert dst.read(0x2_0000, 6) == b"logged" and dst.read(0x9_0000, 10) == bytes(10)
