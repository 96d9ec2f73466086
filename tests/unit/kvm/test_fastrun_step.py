"""The ctypes twin of the compiled ``pv_run``: the exit summary decoded from crafted ``kvm_run`` contents.

The ioctl is replaced by a function returning a chosen result, so the decoding
runs on buffers laid out like the vCPU mapping; the compiled helper and the
ctypes step are run against each other on the real /dev/kvm in
tests/system/test_kvm_vcpu.py.
"""

from __future__ import annotations

import ctypes
import errno

import pytest

from pyvmm.errors import KvmError
from pyvmm.kvm import abi, fastrun
from pyvmm.kvm.fastrun import OTHER_EXIT, PIO_OUT, SIMPLE_PIO, RunCall
from pyvmm.kvm.ioctls import ExitReason, Ioctl

PIO = fastrun.PIO_DATA_OFF


def step_over(buf: bytearray, result: int = 0, negative_errno: bool = True) -> int:
    seen: list[tuple[int, int, int]] = []

    def ioctl(fd: int, request: int, arg: int) -> int:
        seen.append((fd, request, arg))
        return result

    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    s = fastrun.run_step(RunCall(ioctl, negative_errno, False), 7, buf, addr)
    assert not s.compiled and s.args == (7, int(Ioctl.RUN), PIO)
    r = s.fn(*s.args)
    assert seen == [(7, int(Ioctl.RUN), 0)]
    return r


def io_exit(direction: int, size: int, port: int, count: int = 1, data_offset: int = PIO,
            data: bytes = b"") -> bytearray:
    buf = bytearray(3 * 4096)
    run = abi.KvmRun.from_buffer(buf)
    run.exit_reason = ExitReason.IO
    run.u.io.direction, run.u.io.size, run.u.io.port = direction, size, port
    run.u.io.count, run.u.io.data_offset = count, data_offset
    del run
    buf[PIO:PIO + len(data)] = data
    return buf


def decode(r: int) -> tuple[int, int, int, int]:
    """(port, size, out, value) from a SIMPLE_PIO summary, as the vCPU loop reads it."""
    assert r & SIMPLE_PIO and r & 0x7F == ExitReason.IO
    return (r >> 12) & 0xFFFF, (r >> 9) & 7, int(bool(r & PIO_OUT)), r >> 28


@pytest.mark.parametrize(("size", "data", "value"), [(1, b"\xa5", 0xA5), (2, b"\x34\x12", 0x1234),
                                                     (4, b"\xff\xff\xff\xff", 0xFFFFFFFF)])
def test_single_out_is_decoded_with_its_value(size: int, data: bytes, value: int) -> None:
    assert decode(step_over(io_exit(1, size, 0xFFFF, data=data))) == (0xFFFF, size, 1, value)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_single_in_is_decoded_without_a_value(size: int) -> None:
    buf = io_exit(0, size, 0x60, data=b"\xff\xff\xff\xff")  # stale data in the page is not a value
    assert decode(step_over(buf)) == (0x60, size, 0, 0)


@pytest.mark.parametrize(("size", "count", "data_offset"), [
    (1, 5, PIO), (2, 0, PIO), (3, 1, PIO), (0, 1, PIO), (8, 1, PIO),
    (1, 1, PIO + 1), (1, 1, 0), (4, 1, (1 << 64) - 1),
])
def test_other_port_exits_are_left_to_the_general_handler(size: int, count: int, data_offset: int) -> None:
    assert step_over(io_exit(1, size, 0x510, count, data_offset)) == ExitReason.IO


@pytest.mark.parametrize(("reason", "summary"), [(ExitReason.HLT, 5), (ExitReason.MMIO, 6),
                                                 (ExitReason.SYSTEM_EVENT, 24), (0x7E, 0x7E),
                                                 (0x7F, OTHER_EXIT), (0x80, OTHER_EXIT),
                                                 (0xFFFFFFFF, OTHER_EXIT)])
def test_other_exit_reasons_are_returned_or_flagged_as_too_large(reason: int, summary: int) -> None:
    buf = bytearray(3 * 4096)
    buf[abi.KVM_RUN_EXIT_REASON_OFFSET:abi.KVM_RUN_EXIT_REASON_OFFSET + 4] = reason.to_bytes(4, "little")
    assert step_over(buf) == summary


def test_ioctl_failure_is_minus_errno_either_way() -> None:
    assert step_over(io_exit(1, 1, 0x80), -errno.EINTR, negative_errno=True) == -errno.EINTR
    ctypes.set_errno(errno.EAGAIN)
    assert step_over(io_exit(1, 1, 0x80), -1, negative_errno=False) == -errno.EAGAIN


def test_a_mapping_without_the_port_data_page_is_refused() -> None:
    buf = bytearray(4096)
    with pytest.raises(KvmError, match="no port I/O data page"):
        fastrun.run_step(fastrun.fallback_call(), 0, buf, 0)
