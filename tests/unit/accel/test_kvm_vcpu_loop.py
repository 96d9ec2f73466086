"""VcpuRunner's one loop and its run states, driven by scripted ``kvm_run`` contents.

KVM_RUN is replaced by a function that writes the next scripted exit into an
anonymous mapping laid out like the vCPU's; everything else (the RunStep's
decoding, the inlined port fast path, the exit handlers, the state machine,
kicks) is the code the accelerator runs.  The same loop on the real /dev/kvm
is tested in tests/system/test_kvm_vcpu.py; here the exits include malformed
ones that real KVM never produces.
"""

from __future__ import annotations

import errno
import mmap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyvmm.accel.kvm_vcpu import VcpuRunner, VcpuRunState, install_kick_handler
from pyvmm.bus import Bus
from pyvmm.errors import AccelError, KvmError
from pyvmm.kvm import abi, fastrun
from pyvmm.kvm.fastrun import RunCall
from pyvmm.kvm.ioctls import ExitReason
from pyvmm.runstate import RequestKind, VmControl
from support.recording import RecordingDevice, drain
from support.waiting import wait_until

PIO = fastrun.PIO_DATA_OFF
Exit = Callable[[abi.KvmRun], None]


def io(direction: int, size: int, port: int, data: int = 0, count: int = 1, data_offset: int = PIO) -> Exit:
    def write(run: abi.KvmRun) -> None:
        run.exit_reason = ExitReason.IO
        run.u.io.direction, run.u.io.size, run.u.io.port = direction, size, port
        run.u.io.count, run.u.io.data_offset = count, data_offset
        if direction and PIO <= data_offset <= 3 * 4096 - size:
            ScriptedVcpu.current.run_mmap[data_offset:data_offset + size] = data.to_bytes(size, "little")
    return write


def reason(r: int) -> Exit:
    def write(run: abi.KvmRun) -> None:
        run.exit_reason = r
    return write


class ScriptedVcpu:
    """A Vcpu stand-in whose KVM_RUN plays ``script`` (an iterator of exits), then HLT."""

    current: ScriptedVcpu
    index = 0
    fd = 0

    def __init__(self, script: Iterator[Exit]) -> None:
        self.run_mmap = mmap.mmap(-1, 3 * 4096)
        self.run: abi.KvmRun | None = abi.KvmRun.from_buffer(self.run_mmap)
        self.script = script
        self.pio_seen: list[bytes] = []  # the PIO page at each KVM_RUN: how the loop answered the last IN
        ScriptedVcpu.current = self

    def kvm_run(self, fd: int, request: int, arg: int) -> int:
        run = self.run
        assert run is not None
        self.pio_seen.append(bytes(self.run_mmap[PIO:PIO + 4]))
        if run.immediate_exit:
            return -errno.EINTR
        next(self.script, reason(ExitReason.HLT))(run)
        return 0

    def call(self) -> RunCall:
        return RunCall(self.kvm_run, True, False)

    def get_regs(self) -> abi.KvmRegs:
        raise KvmError("a scripted vCPU has no registers")

    get_sregs = get_regs

    def close(self) -> None:
        self.run = None
        self.run_mmap.close()


def runner(script: Iterator[Exit], io_bus: Bus | None = None, control: VmControl | None = None
           ) -> tuple[VcpuRunner, ScriptedVcpu]:
    vcpu = ScriptedVcpu(script)
    r = VcpuRunner(vcpu, io_bus or Bus("io"), Bus("mmio"), control or VmControl(),  # type: ignore[arg-type]
                   halt_action="stop", run_call=vcpu.call())
    return r, vcpu


def spin(port: int) -> Iterator[Exit]:
    while True:
        yield io(1, 1, port, 0x42)
        time.sleep(0.0005)  # let other threads have the GIL


def pending(control: VmControl) -> list[tuple[RequestKind, str]]:
    """(kind, reason) of each request the loop queued."""
    return [(q.kind, q.reason) for q in drain(control)]


@pytest.fixture(autouse=True)
def _kick_handler() -> None:
    install_kick_handler()


def test_port_fast_path_and_general_path_in_one_loop() -> None:
    bus = Bus("io")
    dev = RecordingDevice(read_value=0x7_89AB_CDEF)
    bus.register(0x510, 4, dev, "dev")
    script = iter([io(1, 1, 0x510, 0x5A), io(1, 4, 0x511, 0xDEADBEEF), io(0, 2, 0x512),
                   io(0, 4, 0x600), io(1, 2, 0x513, 0x1234, count=1, data_offset=PIO + 2),
                   reason(ExitReason.NMI)])
    r, vcpu = runner(script, bus)
    assert r.state is VcpuRunState.CREATED and not r.running and not r.parked
    r.run()
    assert r.state is VcpuRunState.STOPPED and r.last_exit == ExitReason.HLT
    # The last write's data was not at the PIO page, so the checked general handler took it.
    assert dev.writes == [(0, 1, 0x5A), (1, 4, 0xDEADBEEF), (3, 2, 0x1234)]
    assert dev.reads == [(2, 2)]
    # The IN of 2 bytes answered masked, the unassigned IN of 4 with all-ones.
    assert vcpu.pio_seen[3][:2] == b"\xef\xcd" and vcpu.pio_seen[4] == b"\xff\xff\xff\xff"
    vcpu.close()


@pytest.mark.parametrize(("exit_", "what"), [
    (io(0, 4, 0x510, data_offset=0), "offset 0x0"),
    (io(0, 1, 0x510, data_offset=3 * 4096), "offset 0x3000"),
    (io(1, 3, 0x510), "size 3"),
    (io(0, 2, 0x510, count=0x10000), "count 65536"),
])
def test_malformed_port_exit_ends_the_loop_with_an_error(exit_: Exit, what: str) -> None:
    bus = Bus("io")
    dev = RecordingDevice(read_value=0xFFFFFFFF)
    bus.register(0x510, 4, dev, "dev")
    r, vcpu = runner(iter([exit_]), bus)
    r.run()
    reqs = pending(r.control)
    assert len(reqs) == 1 and reqs[0][0] == RequestKind.ERROR and what in reqs[0][1]
    assert dev.reads == [] and dev.writes == []
    assert vcpu.run is not None and vcpu.run.immediate_exit == 0 and vcpu.run.exit_reason == ExitReason.IO
    assert r.error_dump is not None and "register dump unavailable" in r.error_dump
    assert r.state is VcpuRunState.STOPPED
    vcpu.close()


def test_exit_reason_too_large_for_the_summary_is_read_from_kvm_run() -> None:
    r, vcpu = runner(iter([reason(0x1234)]))
    r.run()
    assert r.last_exit == 0x1234
    assert pending(r.control) == [(RequestKind.ERROR, "vCPU 0: unexpected KVM exit reason 4660")]
    vcpu.close()


def test_pause_resume_stop_and_restart_move_through_the_states() -> None:
    bus = Bus("io")
    dev = RecordingDevice()
    bus.register(0x80, 1, dev, "post")
    r, vcpu = runner(spin(0x80), bus)
    r.start()
    assert wait_until(lambda: len(dev.writes) > 3)
    assert r.state is VcpuRunState.RUNNING and r.running and not r.parked
    r.request_pause()
    assert r.wait_parked(5) and r.state is VcpuRunState.PAUSED
    n = len(dev.writes)
    assert r.call(lambda: threading.current_thread().name) == threading.current_thread().name  # inline
    time.sleep(0.02)
    assert len(dev.writes) == n, "a paused vCPU ran the guest"
    r.resume()
    assert wait_until(lambda: r.state is VcpuRunState.RUNNING and len(dev.writes) > n)
    assert r.call(lambda: threading.current_thread().name) == "vcpu0"  # served by the vCPU thread
    r.request_stop()
    r.join(5)
    assert r.state is VcpuRunState.STOPPED and r.last_exit == ExitReason.INTR
    r.start()  # STOPPED -> RUNNING again
    assert wait_until(lambda: len(dev.writes) > n + 3)
    r.request_stop()
    r.join(5)
    assert r.state is VcpuRunState.STOPPED and not r.thread.is_alive()  # type: ignore[union-attr]
    assert pending(r.control) == []
    vcpu.close()


def test_a_device_request_holds_the_vcpu_until_stopped() -> None:
    bus = Bus("io")
    control = VmControl()
    dev = RecordingDevice(on_write=lambda *_: control.request_exit(3, "debug exit"))
    bus.register(0x501, 1, dev, "debug-exit")
    r, vcpu = runner(iter([io(1, 1, 0x501, 1), io(1, 1, 0x501, 2)]), bus, control)
    r.start()
    assert wait_until(lambda: r.state is VcpuRunState.HELD)
    assert r.parked and r.running and r.wait_parked(1)
    time.sleep(0.02)
    assert dev.writes == [(0, 1, 1)], "a held vCPU re-entered the guest"
    r.request_pause()
    r.resume()
    assert r.state is VcpuRunState.HELD  # pause/resume do not release a hold
    r.request_stop()
    r.join(5)
    assert r.state is VcpuRunState.STOPPED
    assert pending(control) == [(RequestKind.EXIT, "debug exit")]
    vcpu.close()


def test_transitions_are_checked() -> None:
    r, vcpu = runner(spin(0x80))
    with r._cond:
        for bad in (VcpuRunState.PAUSED, VcpuRunState.HELD, VcpuRunState.STOPPED, VcpuRunState.CREATED):
            with pytest.raises(AccelError, match=f"cannot go from created to {bad.value}"):
                r._set_state(bad)
    assert r.state is VcpuRunState.CREATED
    r.start()
    with pytest.raises(AccelError, match="already running"):
        r.start()
    with pytest.raises(AccelError, match="cannot go from running to running"):
        r.run()
    r.request_stop()
    r.join(5)
    with r._cond:
        with pytest.raises(AccelError, match="cannot go from stopped to paused"):
            r._set_state(VcpuRunState.PAUSED)
        r._state = VcpuRunState.HELD  # a stop, or a resume after the machine paused, leaves HELD
        with pytest.raises(AccelError, match="cannot go from held to paused"):
            r._set_state(VcpuRunState.PAUSED)
        r._set_state(VcpuRunState.RUNNING)
        r._state = VcpuRunState.HELD
        r._set_state(VcpuRunState.STOPPED)
    vcpu.close()


def test_a_call_queued_as_the_loop_ends_runs_exactly_once() -> None:
    runs: list[str] = []
    results: list[object] = []
    r: VcpuRunner

    def fn() -> str:
        runs.append(threading.current_thread().name)
        return "done"

    def last_exit(run: abi.KvmRun) -> None:
        caller = threading.Thread(target=lambda: results.append(r.call(fn)), name="caller")
        caller.start()
        assert wait_until(lambda: bool(r._calls))
        run.immediate_exit = 0  # the kick arrives after this exit: the loop ends on HLT first
        run.exit_reason = ExitReason.HLT

    r, vcpu = runner(iter([last_exit]))
    r.run()
    assert wait_until(lambda: bool(results))
    assert results == ["done"] and runs == [threading.current_thread().name]
    vcpu.close()


def test_a_closed_vcpu_is_refused() -> None:
    vcpu = ScriptedVcpu(iter([]))
    vcpu.close()
    with pytest.raises(AccelError, match="vCPU 0 is closed"):
        VcpuRunner(vcpu, Bus("io"), Bus("mmio"), VmControl(), run_call=vcpu.call())  # type: ignore[arg-type]
