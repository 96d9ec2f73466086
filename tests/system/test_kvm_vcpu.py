"""Exit handling on the real /dev/kvm: tiny real-mode guests driven by VcpuRunner, no irqchip.

Guests stay a handful of instructions: on hosts without hardware
virtualization ring-0 code is emulated by the host kernel, slowly.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
import time

import pytest
from test_kvm_util import RawGuest, assemble

from pyvmm.accel.kvm_vcpu import install_kick_handler
from pyvmm.cpu_state import CR0_ET, CR0_NE, CR0_PE, CpuState, Segment
from pyvmm.kvm import fastrun
from pyvmm.kvm.ioctls import ExitReason
from pyvmm.runstate import RequestKind
from support.recording import RecordingDevice, drain

ORG = 0x1000
CALLS = ["compiled", "ctypes"]  # the exit loop with the compiled helper and with plain ctypes


def run_call(kind: str) -> fastrun.RunCall:
    return fastrun.run_call() if kind == "compiled" else fastrun.fallback_call()


def flat32_state(rip: int) -> CpuState:
    flat_data = Segment.flat32(0x10, code=False)
    return CpuState(regs={"rip": rip}, cs=Segment.flat32(0x08, code=True), ds=flat_data, es=flat_data,
                    ss=flat_data, fs=flat_data, gs=flat_data, cr0=CR0_PE | CR0_ET | CR0_NE)


@pytest.fixture(autouse=True)
def _kick_handler() -> None:
    install_kick_handler()


@pytest.mark.parametrize("call", CALLS)
def test_port_io_out_and_in_reach_the_device_then_hlt(call: str) -> None:
    code = assemble("""
        mov dx, 0x510
        mov al, 0x5a
        out dx, al
        mov ax, 0x1234
        out dx, ax
        mov eax, 0xdeadbeef
        out dx, eax
        in al, dx
        mov dx, 0x512
        out dx, al
        in ax, dx
        mov dx, 0x600          # unassigned port: reads as all-ones
        in eax, dx
        mov dx, 0x513
        out dx, eax
        hlt
    """, ORG)
    with RawGuest(code, ORG) as g:
        dev = RecordingDevice(read_value=0xA5C3)
        g.io_bus.register(0x510, 4, dev, "test")
        r = g.runner(run_call=run_call(call))
        r.run()
        assert r.last_exit == ExitReason.HLT
        assert dev.writes == [(0, 1, 0x5A), (0, 2, 0x1234), (0, 4, 0xDEADBEEF), (2, 1, 0xC3),
                              (3, 4, 0xFFFFFFFF)]
        # in ax at offset 2 is masked to the access size; the device sees offsets, not ports.
        assert dev.reads == [(0, 1), (2, 2)]
        assert g.vcpu.get_regs().rax & 0xFFFF == 0xFFFF
        assert drain(g.control) == []


@pytest.mark.parametrize("call", CALLS)
def test_string_io_rep_outsb_and_rep_insw(call: str) -> None:
    code = assemble("""
        xor ax, ax
        mov ds, ax
        mov es, ax
        cld
        mov si, offset msg
        mov cx, 5
        mov dx, 0x510
        rep outsb
        mov di, 0x3000
        mov cx, 3
        mov dx, 0x512
        rep insw
        hlt
    msg: .ascii "hello"
    """, ORG)
    with RawGuest(code, ORG) as g:
        out_dev, in_dev = RecordingDevice(), RecordingDevice()
        values = iter([0x1111, 0x2222, 0x3333])
        in_dev.io_read = lambda off, size: next(values)  # type: ignore[method-assign]
        g.io_bus.register(0x510, 1, out_dev, "out")
        g.io_bus.register(0x512, 2, in_dev, "in")
        r = g.runner(run_call=run_call(call))
        r.run()
        assert r.last_exit == ExitReason.HLT
        assert bytes(v for _, _, v in out_dev.writes) == b"hello"
        assert all(off == 0 and size == 1 for off, size, _ in out_dev.writes)
        assert g.mem.read(0x3000, 6) == bytes.fromhex("111122223333")


@pytest.mark.parametrize("call", CALLS)
def test_mmio_exit_to_unmapped_address(call: str) -> None:
    # RAM is 1 MiB; ES=0xffff reaches 0x100000.. in real mode, which is not RAM -> MMIO exits.
    code = assemble("""
        mov ax, 0xffff
        mov es, ax
        mov word ptr es:[0x10], 0xbeef      # write at 0x100000
        mov byte ptr es:[0x13], 0x7         # write at 0x100003
        mov eax, dword ptr es:[0x14]        # read at 0x100004
        mov dx, 0x510
        out dx, eax
        mov eax, dword ptr es:[0x110]       # unassigned: all-ones
        out dx, eax
        hlt
    """, ORG)
    with RawGuest(code, ORG) as g:
        dev = RecordingDevice(read_value=0xCAFEF00D)
        port = RecordingDevice()
        g.mmio_bus.register(0x100000, 0x10, dev, "mmio-test")
        g.io_bus.register(0x510, 1, port, "port")
        r = g.runner(run_call=run_call(call))
        r.run()
        assert r.last_exit == ExitReason.HLT
        assert dev.writes == [(0, 2, 0xBEEF), (3, 1, 7)]
        assert dev.reads == [(4, 4)]
        assert [v for _, _, v in port.writes] == [0xCAFEF00D, 0xFFFFFFFF]


def test_kvm_run_helper_is_compiled_and_matches_ctypes() -> None:
    fast, slow = fastrun.run_call(), fastrun.fallback_call()
    assert fast.compiled, "the cffi KVM_RUN helper could not be built (needs cffi and gcc)"
    assert fast.fn(-1, 0xAE80, 0) == -errno.EBADF
    assert slow.fn(-1, 0xAE80, 0) == -1 and ctypes.get_errno() == errno.EBADF


@pytest.mark.parametrize("call", CALLS)
def test_kick_stops_a_spinning_guest_and_pause_parks_it(call: str) -> None:
    code = assemble("""
        mov dx, 0x510
        out dx, al
    1:  jmp 1b
    """, ORG)
    with RawGuest(code, ORG) as g:
        dev = RecordingDevice()
        g.io_bus.register(0x510, 1, dev, "test")
        r = g.runner(run_call=run_call(call))
        r.start()
        deadline = time.monotonic() + 5
        while not dev.writes and time.monotonic() < deadline:
            time.sleep(0.005)
        assert dev.writes, "guest never reached its spin loop"
        time.sleep(0.05)  # now it spins inside KVM_RUN
        r.request_pause()
        assert r.wait_parked(5), "vCPU did not park after a kick"
        # While parked, state can be read from this thread.
        dump = r.call(r.dump_state)
        assert "RIP=" in dump and "CS =0000" in dump
        rip = g.vcpu.get_regs().rip
        assert ORG <= rip < ORG + len(code)
        r.resume()
        time.sleep(0.05)
        assert not r.parked
        # call() from another thread while the guest spins: served by the vCPU thread after a kick.
        assert "RIP=" in r.call(r.dump_state, timeout=5)
        t0 = time.monotonic()
        r.request_stop()
        r.join(5)
        assert not r.thread.is_alive(), "vCPU thread still running after stop"
        assert time.monotonic() - t0 < 5
        assert r.last_exit == ExitReason.INTR
        assert g.vcpu.run.immediate_exit == 0 or not r.running
        assert drain(g.control) == []


@pytest.mark.parametrize("call", CALLS)
def test_triple_fault_requests_reset(call: str) -> None:
    # Protected mode with an empty IDT: #UD -> #GP (IDT limit) -> #DF -> triple fault -> KVM_EXIT_SHUTDOWN.
    code = assemble("""
        lidt [idtr]
        ud2
    idtr: .word 0
          .long 0
    """, ORG, bits=32)
    with RawGuest(code, ORG, state=flat32_state(ORG)) as g:
        r = g.runner(run_call=run_call(call))
        r.run()
        assert r.last_exit == ExitReason.SHUTDOWN
        reqs = drain(g.control)
        assert [(q.kind, q.reason) for q in reqs] == [(RequestKind.RESET, "triple fault")]


@pytest.mark.parametrize("call", CALLS)
def test_emulation_failure_requests_error_with_register_dump(call: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # POPCNT with an MMIO operand must be emulated by KVM, whose emulator does not implement it.
    code = assemble("""
        mov ax, 0xffff
        mov es, ax
        popcnt ax, word ptr es:[0x10]
        hlt
    """, ORG)
    with RawGuest(code, ORG) as g, caplog.at_level(logging.ERROR, logger="pyvmm.accel.kvm_vcpu"):
        r = g.runner(run_call=run_call(call))
        r.run()
        assert r.last_exit == ExitReason.INTERNAL_ERROR
        reqs = drain(g.control)
        assert len(reqs) == 1 and reqs[0].kind == RequestKind.ERROR
        assert "emulation" in reqs[0].reason and "\n" not in reqs[0].reason
        dump = r.error_dump
        assert dump is not None
        for needle in ("RAX=", "RIP=", "RFL=", "ES =ffff", "CS =0000", "SS =", "LDT=", "TR =", "GDT=",
                       "IDT=", "CR0=", "CR3=", "EFER="):
            assert needle in dump, needle
        assert f"RIP={ORG + 5:016x}" in dump  # the popcnt (after two 3-/2-byte movs)
        assert "RIP=" in caplog.text and reqs[0].reason in caplog.text


def test_device_exception_is_reported_not_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    code = assemble("""
        mov dx, 0x510
        out dx, al
        hlt
    """, ORG)

    class Broken:
        def io_read(self, offset: int, size: int) -> int:
            return 0

        def io_write(self, offset: int, size: int, value: int) -> None:
            raise RuntimeError("device bug")

    with RawGuest(code, ORG) as g, caplog.at_level(logging.ERROR, logger="pyvmm.accel.kvm_vcpu"):
        g.io_bus.register(0x510, 1, Broken(), "broken")
        r = g.runner()
        r.start()
        r.join(5)
        reqs = drain(g.control)
        assert len(reqs) == 1 and reqs[0].kind == RequestKind.ERROR
        assert "device bug" in reqs[0].reason
        assert "Traceback" in caplog.text and "RuntimeError: device bug" in caplog.text


def test_runner_call_on_stopped_vcpu_runs_inline() -> None:
    code = assemble("hlt", ORG)
    with RawGuest(code, ORG) as g:
        r = g.runner()
        assert r.call(lambda: threading.get_ident()) == threading.get_ident()
