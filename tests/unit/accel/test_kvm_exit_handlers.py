"""The KVM exit handlers on crafted ``kvm_run`` contents: no /dev/kvm needed.

Each test lays out one exit in a buffer shaped like the vCPU's ``kvm_run``
mapping (three pages, as on x86: kvm_run, the port I/O data page, the
coalesced-MMIO ring) and runs the handler with real buses and a real
``VmControl``.  The values KVM copies from the guest's access (sizes, counts,
the data offset) are also given malformed, which real KVM never produces, to
check that no access leaves the mapping.
"""

from __future__ import annotations

import ctypes
import logging

import pytest

from pyvmm.accel import kvm_exits
from pyvmm.accel.kvm_exits import ExitAction, ExitContext, handle_exit
from pyvmm.bus import Bus
from pyvmm.kvm import abi
from pyvmm.kvm.ioctls import ExitReason, InternalError, SystemEvent
from pyvmm.runstate import RequestKind, VmControl
from support.recording import RecordingDevice, drain

MAP_SIZE = 3 * 4096
PIO = kvm_exits.PIO_DATA_OFF
DUMP = "CPU#0\nRAX=0000000000000000 RIP=0000000000001000"


def make_ctx(dump: object = DUMP) -> ExitContext:
    def dumper() -> str:
        if isinstance(dump, Exception):
            raise dump
        return str(dump)

    return ExitContext(0, Bus("io"), Bus("mmio"), VmControl(), dump=dumper)


def kvm_run(reason: int) -> tuple[bytearray, abi.KvmRun]:
    buf = bytearray(MAP_SIZE)
    run = abi.KvmRun.from_buffer(buf)
    run.exit_reason = reason
    return buf, run


def pio(direction: int, size: int, port: int, count: int = 1, data_offset: int = PIO,
        data: bytes = b"") -> bytearray:
    buf, run = kvm_run(ExitReason.IO)
    io = run.u.io
    io.direction, io.size, io.port, io.count, io.data_offset = direction, size, port, count, data_offset
    del run, io
    if data:
        buf[data_offset:data_offset + len(data)] = data
    return buf


def mmio(addr: int, length: int, is_write: bool, data: bytes = b"") -> bytearray:
    buf, run = kvm_run(ExitReason.MMIO)
    m = run.u.mmio
    m.phys_addr, m.len, m.is_write = addr, length, int(is_write)
    del run, m
    off = kvm_exits.MMIO_DATA_OFF
    buf[off:off + len(data)] = data
    return buf


def assert_one_error(ctx: ExitContext, *needles: str) -> str:
    reqs = drain(ctx.control)
    assert len(reqs) == 1 and reqs[0].kind == RequestKind.ERROR, reqs
    reason = reqs[0].reason
    assert "\n" not in reason
    for n in needles:
        assert n in reason, (n, reason)
    assert ctx.error_dump == DUMP
    return reason


# -- port I/O --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "data", "value"), [(1, b"\x5a", 0x5A), (2, b"\x34\x12", 0x1234),
                                                     (4, b"\xef\xbe\xad\xde", 0xDEADBEEF)])
def test_pio_out_reaches_the_device_at_its_offset(size: int, data: bytes, value: int) -> None:
    ctx = make_ctx()
    dev = RecordingDevice()
    ctx.io_bus.register(0x510, 4, dev, "dev")
    buf = pio(1, size, 0x512, data=data)
    assert handle_exit(ExitReason.IO, buf, ctx) is ExitAction.CONTINUE
    assert dev.writes == [(2, size, value)] and dev.reads == []
    assert drain(ctx.control) == []


@pytest.mark.parametrize(("size", "expect"), [(1, b"\xc3\x00\x00\x00"), (2, b"\xc3\xa5\x00\x00"),
                                              (4, b"\xc3\xa5\x5a\x3c")])
def test_pio_in_is_masked_to_the_access_size(size: int, expect: bytes) -> None:
    ctx = make_ctx()
    dev = RecordingDevice(read_value=0x7E3C5AA5C3)  # wider than any access: the handler masks it
    ctx.io_bus.register(0x60, 1, dev, "dev")
    buf = pio(0, size, 0x60)
    assert handle_exit(ExitReason.IO, buf, ctx) is ExitAction.CONTINUE
    assert dev.reads == [(0, size)]
    assert bytes(buf[PIO:PIO + 4]) == expect
    assert not any(buf[PIO + 4:])


def test_string_out_writes_every_item_in_order() -> None:
    ctx = make_ctx()
    dev = RecordingDevice()
    ctx.io_bus.register(0x3F8, 8, dev, "com1")
    buf = pio(1, 1, 0x3F8, count=5, data=b"hello")
    assert handle_exit(ExitReason.IO, buf, ctx) is ExitAction.CONTINUE
    assert dev.writes == [(0, 1, c) for c in b"hello"]
    words = pio(1, 2, 0x3FA, count=3, data=bytes.fromhex("111122223333"))
    handle_exit(ExitReason.IO, words, ctx)
    assert dev.writes[5:] == [(2, 2, 0x1111), (2, 2, 0x2222), (2, 2, 0x3333)]


def test_string_in_fills_every_item() -> None:
    ctx = make_ctx()
    dev = RecordingDevice(values=[0x11111111, 0x2222, 0x33])
    ctx.io_bus.register(0x1F0, 8, dev, "ide")
    buf = pio(0, 2, 0x1F0, count=3)
    assert handle_exit(ExitReason.IO, buf, ctx) is ExitAction.CONTINUE
    assert dev.reads == [(0, 2)] * 3
    assert bytes(buf[PIO:PIO + 8]) == bytes.fromhex("1111222233000000")


def test_unassigned_port_reads_all_ones_and_drops_writes() -> None:
    ctx = make_ctx()
    dev = RecordingDevice()
    ctx.io_bus.register(0x510, 1, dev, "elsewhere")
    buf = pio(0, 4, 0x600, count=2)
    assert handle_exit(ExitReason.IO, buf, ctx) is ExitAction.CONTINUE
    assert bytes(buf[PIO:PIO + 9]) == b"\xff" * 8 + b"\x00"
    buf = pio(1, 2, 0x511, data=b"\x01\x02")  # just past the device's one port
    assert handle_exit(ExitReason.IO, buf, ctx) is ExitAction.CONTINUE
    assert dev.writes == [] and dev.reads == []
    assert drain(ctx.control) == []


@pytest.mark.parametrize(("size", "count", "data_offset", "what"), [
    (0, 1, PIO, "size 0"),
    (3, 1, PIO, "size 3"),
    (8, 1, PIO, "size 8"),
    (1, 0, PIO, "count 0"),
    (4, 1, MAP_SIZE - 3, "offset 0x2ffd"),               # the last item would straddle the end
    (1, 1, MAP_SIZE, "offset 0x3000"),                   # just past the mapping
    (2, 4097, MAP_SIZE - 8192, "count 4097"),            # string I/O running off the end
    (4, 0xFFFFFFFF, PIO, "count 4294967295"),
    (1, 1, (1 << 64) - 1, "offset 0xffffffffffffffff"),
    (1, 1, 0, "offset 0x0"),                             # inside kvm_run itself (immediate_exit, ...)
    (4, 1, kvm_exits.KVM_RUN_SIZE - 2, "offset"),        # straddling the end of kvm_run
])
@pytest.mark.parametrize("direction", [0, 1])
def test_malformed_pio_exit_is_an_error_and_touches_nothing(direction: int, size: int, count: int,
                                                            data_offset: int, what: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ctx = make_ctx()
    dev = RecordingDevice(read_value=0xFFFFFFFF)
    ctx.io_bus.register(0x510, 4, dev, "dev")
    buf = pio(direction, size, 0x510, count=count, data_offset=data_offset)
    before = bytes(buf)
    with caplog.at_level(logging.ERROR):
        assert handle_exit(ExitReason.IO, buf, ctx) is ExitAction.STOP
    assert len(buf) == MAP_SIZE and bytes(buf) == before
    assert dev.reads == [] and dev.writes == []
    assert_one_error(ctx, "malformed I/O exit", "port 0x510", what)
    assert "RIP=" in caplog.text


def test_pio_data_anywhere_in_the_mapping_past_kvm_run_is_accepted() -> None:
    ctx = make_ctx()
    dev = RecordingDevice(read_value=0xAB)
    ctx.io_bus.register(0x80, 1, dev, "post")
    for off in (kvm_exits.KVM_RUN_SIZE, MAP_SIZE - 1):
        buf = pio(0, 1, 0x80, data_offset=off)
        assert handle_exit(ExitReason.IO, buf, ctx) is ExitAction.CONTINUE
        assert buf[off] == 0xAB
    assert drain(ctx.control) == []


# -- MMIO ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 2, 3, 4, 8])
def test_mmio_write_delivers_the_little_endian_value(length: int) -> None:
    ctx = make_ctx()
    dev = RecordingDevice()
    ctx.mmio_bus.register(0xFED00000, 0x1000, dev, "hpet")
    data = bytes(range(0x11, 0x19))
    buf = mmio(0xFED00010, length, True, data)
    assert handle_exit(ExitReason.MMIO, buf, ctx) is ExitAction.CONTINUE
    assert dev.writes == [(0x10, length, int.from_bytes(data[:length], "little"))]


@pytest.mark.parametrize("length", [1, 2, 4, 8])
def test_mmio_read_answers_in_mmio_data(length: int) -> None:
    ctx = make_ctx()
    dev = RecordingDevice(read_value=0x1_8877665544332211)  # one bit wider than 8 bytes: masked
    ctx.mmio_bus.register(0xFEC00000, 0x20, dev, "ioapic")
    buf = mmio(0xFEC00004, length, False)
    assert handle_exit(ExitReason.MMIO, buf, ctx) is ExitAction.CONTINUE
    assert dev.reads == [(4, length)]
    off = kvm_exits.MMIO_DATA_OFF
    assert bytes(buf[off:off + 8]) == bytes.fromhex("1122334455667788")[:length] + bytes(8 - length)


def test_unassigned_mmio_reads_all_ones_and_drops_writes() -> None:
    ctx = make_ctx()
    dev = RecordingDevice()
    ctx.mmio_bus.register(0x1000, 0x10, dev, "dev")
    buf = mmio(0x1010, 4, False)
    assert handle_exit(ExitReason.MMIO, buf, ctx) is ExitAction.CONTINUE
    off = kvm_exits.MMIO_DATA_OFF
    assert bytes(buf[off:off + 8]) == b"\xff" * 4 + bytes(4)
    buf = mmio(0xFFF, 2, True, b"\x01\x02")  # just below the device
    assert handle_exit(ExitReason.MMIO, buf, ctx) is ExitAction.CONTINUE
    assert dev.reads == [] and dev.writes == []
    assert drain(ctx.control) == []


@pytest.mark.parametrize("length", [0, 9, 16, 0xFFFFFFFF])
@pytest.mark.parametrize("is_write", [False, True])
def test_malformed_mmio_length_is_an_error_and_touches_nothing(length: int, is_write: bool) -> None:
    ctx = make_ctx()
    dev = RecordingDevice(read_value=0x55)
    ctx.mmio_bus.register(0x1000, 0x10, dev, "dev")
    buf = mmio(0x1000, length, is_write, b"\xaa" * 8)
    before = bytes(buf)
    assert handle_exit(ExitReason.MMIO, buf, ctx) is ExitAction.STOP
    assert bytes(buf) == before
    assert dev.reads == [] and dev.writes == []
    assert_one_error(ctx, "malformed MMIO exit", f"len {length}", "0x1000")


# -- the other exits --------------------------------------------------------------------------------
def test_hlt_intr_and_ignored_exits_only_return_an_action() -> None:
    ctx = make_ctx()
    for reason, action in [(ExitReason.HLT, ExitAction.HALT), (ExitReason.INTR, ExitAction.INTERRUPTED),
                           (ExitReason.IRQ_WINDOW_OPEN, ExitAction.CONTINUE),
                           (ExitReason.NMI, ExitAction.CONTINUE)]:
        buf, _ = kvm_run(reason)
        before = bytes(buf)
        assert handle_exit(reason, buf, ctx) is action, reason
        assert bytes(buf) == before
    assert drain(ctx.control) == []


def test_shutdown_is_a_triple_fault_and_requests_reset(caplog: pytest.LogCaptureFixture) -> None:
    ctx = make_ctx()
    buf, _ = kvm_run(ExitReason.SHUTDOWN)
    with caplog.at_level(logging.INFO, logger="pyvmm.accel.kvm_exits"):
        assert handle_exit(ExitReason.SHUTDOWN, buf, ctx) is ExitAction.STOP
    assert [(r.kind, r.reason) for r in drain(ctx.control)] == [(RequestKind.RESET, "triple fault")]
    assert "triple fault" in caplog.text and "RIP=" in caplog.text


@pytest.mark.parametrize(("event", "kind", "reason"), [
    (SystemEvent.SHUTDOWN, RequestKind.POWEROFF, "guest requested power-off"),
    (SystemEvent.RESET, RequestKind.RESET, "guest requested reset"),
    (SystemEvent.CRASH, RequestKind.ERROR, "vCPU 0: guest crashed (system event)"),
])
def test_system_event_becomes_a_life_cycle_request(event: int, kind: RequestKind, reason: str) -> None:
    ctx = make_ctx()
    buf, run = kvm_run(ExitReason.SYSTEM_EVENT)
    run.u.system_event.type = event
    assert handle_exit(ExitReason.SYSTEM_EVENT, buf, ctx) is ExitAction.STOP
    assert [(r.kind, r.reason) for r in drain(ctx.control)] == [(kind, reason)]
    assert (ctx.error_dump == DUMP) == (kind == RequestKind.ERROR)


@pytest.mark.parametrize("event", [SystemEvent.WAKEUP, SystemEvent.SUSPEND, 0, 0xFFFFFFFF])
def test_other_system_events_are_ignored(event: int) -> None:
    ctx = make_ctx()
    buf, run = kvm_run(ExitReason.SYSTEM_EVENT)
    run.u.system_event.type = event
    assert handle_exit(ExitReason.SYSTEM_EVENT, buf, ctx) is ExitAction.CONTINUE
    assert drain(ctx.control) == []


def test_fail_entry_reports_the_hardware_reason() -> None:
    ctx = make_ctx()
    buf, run = kvm_run(ExitReason.FAIL_ENTRY)
    run.u.fail_entry.hardware_entry_failure_reason = 0x80000021
    assert handle_exit(ExitReason.FAIL_ENTRY, buf, ctx) is ExitAction.STOP
    assert assert_one_error(ctx) == "vCPU 0: KVM entry failed, hardware error 0x80000021"


def test_internal_error_emulation_shows_the_instruction_bytes() -> None:
    ctx = make_ctx()
    buf, run = kvm_run(ExitReason.INTERNAL_ERROR)
    internal = run.u.internal
    internal.suberror, internal.ndata = InternalError.EMULATION, 4
    internal.data[0] = 1  # KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    raw = bytes([5, 0xF3, 0x26, 0x0F, 0xB8, 0x06]) + bytes(10)  # insn_size, then the bytes
    ctypes.memmove(ctypes.addressof(internal.data) + 8, raw, len(raw))
    del run, internal
    assert handle_exit(ExitReason.INTERNAL_ERROR, buf, ctx) is ExitAction.STOP
    assert assert_one_error(ctx) == "vCPU 0: KVM internal error: emulation (instruction bytes: f3 26 0f b8 06)"


def test_internal_error_emulation_clamps_a_bad_instruction_length() -> None:
    ctx = make_ctx()
    buf, run = kvm_run(ExitReason.INTERNAL_ERROR)
    internal = run.u.internal
    internal.suberror, internal.ndata = InternalError.EMULATION, 3
    internal.data[0] = 1
    internal.data[1] = 0xFF | (0xAA << 8)  # insn_size 255: at most 15 bytes exist
    del run, internal
    assert handle_exit(ExitReason.INTERNAL_ERROR, buf, ctx) is ExitAction.STOP
    reason = assert_one_error(ctx, "emulation (instruction bytes: aa 00")
    assert reason.count(" 00") + reason.count(" aa") == 15


@pytest.mark.parametrize(("sub", "ndata", "expect"), [
    (InternalError.DELIVERY_EV, 2, "delivery ev (data: 0x10 0x11)"),
    (InternalError.SIMUL_EX, 0, "simul ex"),
    (99, 1, "suberror 99 (data: 0x10)"),
    (InternalError.UNEXPECTED_EXIT_REASON, 0xFFFFFFFF, "unexpected exit reason (data: 0x10 0x11"),
])
def test_internal_error_names_the_suberror_and_its_data(sub: int, ndata: int, expect: str) -> None:
    ctx = make_ctx()
    buf, run = kvm_run(ExitReason.INTERNAL_ERROR)
    run.u.internal.suberror, run.u.internal.ndata = sub, ndata
    for i in range(16):
        run.u.internal.data[i] = 0x10 + i
    del run
    assert handle_exit(ExitReason.INTERNAL_ERROR, buf, ctx) is ExitAction.STOP
    reason = assert_one_error(ctx)
    assert reason.startswith(f"vCPU 0: KVM internal error: {expect}")
    if ndata > 16:  # a huge ndata shows the 16 entries there are, no more
        assert reason.endswith("0x1f)") and reason.count("0x") == 16


def test_hypercall_returns_enosys_to_the_guest() -> None:
    ctx = make_ctx()
    buf, run = kvm_run(ExitReason.HYPERCALL)
    run.u.hypercall.nr = 9
    assert handle_exit(ExitReason.HYPERCALL, buf, ctx) is ExitAction.CONTINUE
    assert run.u.hypercall.ret == (-1000) & (2**64 - 1)
    assert drain(ctx.control) == []


@pytest.mark.parametrize(("reason", "name"), [(ExitReason.DEBUG, "DEBUG"), (ExitReason.UNKNOWN, "UNKNOWN"),
                                              (ExitReason.X86_RDMSR, "X86_RDMSR"), (99, "99"),
                                              (0xFFFFFFFF, "4294967295")])
def test_unknown_exit_reasons_are_an_error(reason: int, name: str) -> None:
    ctx = make_ctx()
    buf, _ = kvm_run(reason)
    assert handle_exit(reason, buf, ctx) is ExitAction.STOP
    assert assert_one_error(ctx) == f"vCPU 0: unexpected KVM exit reason {name}"


def test_a_failing_register_dump_does_not_hide_the_error() -> None:
    ctx = make_ctx(dump=OSError("vCPU gone"))
    buf, _ = kvm_run(ExitReason.FAIL_ENTRY)
    assert handle_exit(ExitReason.FAIL_ENTRY, buf, ctx) is ExitAction.STOP
    reqs = drain(ctx.control)
    assert [r.kind for r in reqs] == [RequestKind.ERROR]
    assert ctx.error_dump == "(register dump unavailable: vCPU gone)"


def test_every_handled_reason_is_in_the_table() -> None:
    handled = {ExitReason(r).name for r in kvm_exits.HANDLERS}
    assert handled == {"IO", "MMIO", "HLT", "SHUTDOWN", "SYSTEM_EVENT", "FAIL_ENTRY", "INTERNAL_ERROR",
                       "INTR", "IRQ_WINDOW_OPEN", "NMI", "HYPERCALL"}
