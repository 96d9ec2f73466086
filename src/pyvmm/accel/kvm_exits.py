"""KVM exit handlers: plain functions from ``kvm_run`` contents to an action for the vCPU loop.

Each handler takes the vCPU's ``kvm_run`` mapping (the mmap, or any writable
buffer laid out the same way, so tests can craft one) and an
:class:`ExitContext` (the buses, the life-cycle mailbox, a register dump for
error reports), does what the exit asks, and returns an :class:`ExitAction`
that tells :class:`pyvmm.accel.kvm_vcpu.VcpuRunner` how to go on.  They never
touch the vCPU itself, so they run without /dev/kvm.

Every value in ``kvm_run`` is treated as untrusted (it describes what the
guest did): access sizes, repeat counts and the port data offset are checked
so that no access reaches outside the mapping or into the ``kvm_run`` header,
and a malformed exit ends the loop with an error request instead.

The vCPU loop handles a single port access to an assigned port inline (see
:mod:`pyvmm.accel.kvm_vcpu`); :func:`pio_exit` here is the general case.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvmm.bus import Bus
from pyvmm.kvm import abi, fastrun
from pyvmm.kvm.ioctls import ExitReason, InternalError, SystemEvent
from pyvmm.ratelimit import guest_log
from pyvmm.runstate import VmControl

log = logging.getLogger(__name__)

#: A writable buffer holding ``kvm_run`` (an mmap in the VMM, a bytearray in tests).
RunBuffer = Any

EXIT_OFF = abi.KVM_RUN_EXIT_OFFSET
EXIT_REASON_OFF = abi.KVM_RUN_EXIT_REASON_OFFSET
#: The size of ``struct kvm_run``: port data must lie past it, inside the mapping.
KVM_RUN_SIZE = ctypes.sizeof(abi.KvmRun)
#: Where KVM puts port I/O data (KVM_PIO_PAGE_OFFSET pages into the vCPU mapping).
PIO_DATA_OFF = fastrun.PIO_DATA_OFF
MMIO_DATA_OFF = EXIT_OFF + abi.KvmRunMmio.data.offset
_REASON = struct.Struct("<I")
# kvm_run.io: direction, size, port, count, data_offset.
PIO_HEAD = struct.Struct("<BBHIQ")
assert PIO_HEAD.size == ctypes.sizeof(abi.KvmRunIo)
# kvm_run.mmio: phys_addr, data[8], len, is_write.
MMIO_HEAD = struct.Struct("<Q8sIB")
assert MMIO_HEAD.size == abi.KvmRunMmio.is_write.offset + 1
_HYPERCALL_RET_OFF = EXIT_OFF + abi.KvmRunHypercall.ret.offset
_U64 = struct.Struct("<Q")
#: -KVM_ENOSYS, as a u64: what an unimplemented hypercall returns to the guest.
HYPERCALL_ENOSYS = (-1000) & 0xFFFFFFFFFFFFFFFF
# Keyed by port access size in bytes: a size missing here is a malformed exit.
UNPACK: dict[int, Any] = {1: struct.Struct("<B").unpack_from, 2: struct.Struct("<H").unpack_from,
                          4: struct.Struct("<I").unpack_from}
PACK: dict[int, Any] = {1: struct.Struct("<B").pack_into, 2: struct.Struct("<H").pack_into,
                        4: struct.Struct("<I").pack_into}
MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


class ExitAction(enum.Enum):
    """What the vCPU loop does after an exit was handled."""

    CONTINUE = "continue"        # re-enter the guest
    INTERRUPTED = "interrupted"  # KVM_RUN was interrupted (a kick): serve requests, then re-enter
    HALT = "halt"                # the vCPU executed HLT (no in-kernel irqchip): the runner's halt policy
    STOP = "stop"                # end the loop: a life-cycle request was posted for the machine to act on


def _no_dump() -> str:
    return "(no register dump)"


@dataclass
class ExitContext:
    """What exit handlers may use: the buses, the life-cycle mailbox, a register dump for errors."""

    index: int
    io_bus: Bus
    mmio_bus: Bus
    control: VmControl
    #: A QEMU-style register dump of the vCPU (called only when reporting).
    dump: Callable[[], str] = field(default=_no_dump)
    #: The dump taken by the last :meth:`fail`.
    error_dump: str | None = None

    def safe_dump(self) -> str:
        try:
            return self.dump()
        except Exception as e:  # the dump is diagnostics; never let it hide the original error
            return f"(register dump unavailable: {e})"

    def fail(self, reason: str) -> ExitAction:
        """Report a fatal condition (with a register dump in the log) and stop the loop."""
        text = self.safe_dump()
        self.error_dump = text
        log.error("%s\n%s", reason, text)
        self.control.request_error(reason)
        return ExitAction.STOP


ExitHandler = Callable[[RunBuffer, ExitContext], ExitAction]


def exit_reason(mm: RunBuffer) -> int:
    return int(_REASON.unpack_from(mm, EXIT_REASON_OFF)[0])


def pio_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    """KVM_EXIT_IO: ``count`` accesses of ``size`` bytes to one port, data at ``data_offset``.

    Covers string I/O and unassigned ports (reads all-ones, writes dropped, by the bus).
    """
    out, size, port, count, off = PIO_HEAD.unpack_from(mm, EXIT_OFF)
    unpack = UNPACK.get(size)
    if unpack is None or count < 1 or off < KVM_RUN_SIZE or off + size * count > len(mm):
        return ctx.fail(f"vCPU {ctx.index}: malformed I/O exit (port {port:#x} size {size} "
                        f"count {count} offset {off:#x})")
    bus = ctx.io_bus
    hit = bus.find(port)
    if out:
        if hit is None:
            for i in range(count):
                bus.write(port, size, unpack(mm, off + i * size)[0])
        else:
            write, rel = hit[1].io_write, port - hit[0]
            for i in range(count):
                write(rel, size, unpack(mm, off + i * size)[0])
    else:
        pack = PACK[size]
        if hit is None:
            for i in range(count):
                pack(mm, off + i * size, bus.read(port, size))
        else:
            read, rel, mask = hit[1].io_read, port - hit[0], MASK[size]
            for i in range(count):
                pack(mm, off + i * size, read(rel, size) & mask)
    return ExitAction.CONTINUE


def mmio_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    """KVM_EXIT_MMIO: 1..8 bytes at ``phys_addr``; reads are answered in ``mmio.data``."""
    addr, data, n, is_write = MMIO_HEAD.unpack_from(mm, EXIT_OFF)
    if not 1 <= n <= 8:
        return ctx.fail(f"vCPU {ctx.index}: malformed MMIO exit (len {n} at {addr:#x})")
    bus = ctx.mmio_bus
    try:  # Bus.find, inlined: the entry found must itself cover the address (see kvm_vcpu)
        s, e, dev, _ = (t := bus.table)[1][bisect_right(t[0], addr) - 1]
    except IndexError:
        s = e = 0
    if is_write:
        value = int.from_bytes(data[:n], "little")
        if s <= addr < e:
            dev.io_write(addr - s, n, value)
        else:
            bus.write(addr, n, value)
    else:
        if s <= addr < e:
            value = dev.io_read(addr - s, n) & ((1 << (8 * n)) - 1)
        else:
            value = bus.read(addr, n)
        mm[MMIO_DATA_OFF:MMIO_DATA_OFF + n] = value.to_bytes(n, "little")
    return ExitAction.CONTINUE


def hlt_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    return ExitAction.HALT


def intr_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    return ExitAction.INTERRUPTED


def ignore_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    """IRQ_WINDOW_OPEN, NMI: nothing to do but re-enter."""
    return ExitAction.CONTINUE


def shutdown_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    """KVM_EXIT_SHUTDOWN (a triple fault): the PC resets, as QEMU does."""
    guest_log(log, logging.INFO, "vCPU %d: shutdown (triple fault)\n%s", ctx.index, ctx.safe_dump())
    ctx.control.request_reset("triple fault")
    return ExitAction.STOP


def system_event_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    kind = abi.KvmRunSystemEvent.from_buffer_copy(mm, EXIT_OFF).type
    if kind == SystemEvent.SHUTDOWN:
        ctx.control.request_poweroff("guest requested power-off")
    elif kind == SystemEvent.RESET:
        ctx.control.request_reset("guest requested reset")
    elif kind == SystemEvent.CRASH:
        return ctx.fail(f"vCPU {ctx.index}: guest crashed (system event)")
    else:
        log.debug("vCPU %d: ignoring system event %d", ctx.index, kind)
        return ExitAction.CONTINUE
    return ExitAction.STOP


def fail_entry_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    hw = abi.KvmRunFailEntry.from_buffer_copy(mm, EXIT_OFF).hardware_entry_failure_reason
    return ctx.fail(f"vCPU {ctx.index}: KVM entry failed, hardware error {hw:#x}")


def internal_error_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    internal = abi.KvmRunInternal.from_buffer_copy(mm, EXIT_OFF)
    sub = internal.suberror
    try:
        what = InternalError(sub).name.lower().replace("_", " ")
    except ValueError:
        what = f"suberror {sub}"
    detail = ""
    ndata = min(internal.ndata, len(internal.data))
    if sub == InternalError.EMULATION and ndata >= 3 and internal.data[0] & 1:
        raw = bytes(internal)[16:32]  # emulation_failure: insn_size, then up to 15 instruction bytes
        n = min(raw[0], 15)
        detail = " (instruction bytes: " + " ".join(f"{b:02x}" for b in raw[1:1 + n]) + ")"
    elif ndata:
        detail = " (data: " + " ".join(f"{internal.data[i]:#x}" for i in range(ndata)) + ")"
    return ctx.fail(f"vCPU {ctx.index}: KVM internal error: {what}{detail}")


def hypercall_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    """No hypercalls are implemented: the guest gets -KVM_ENOSYS."""
    _U64.pack_into(mm, _HYPERCALL_RET_OFF, HYPERCALL_ENOSYS)
    return ExitAction.CONTINUE


def unexpected_exit(mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    reason = exit_reason(mm)
    try:
        name = ExitReason(reason).name
    except ValueError:
        name = str(reason)
    return ctx.fail(f"vCPU {ctx.index}: unexpected KVM exit reason {name}")


#: Exit reason -> handler; a reason missing here is :func:`unexpected_exit`.
HANDLERS: dict[int, ExitHandler] = {
    ExitReason.IO: pio_exit,
    ExitReason.MMIO: mmio_exit,
    ExitReason.HLT: hlt_exit,
    ExitReason.SHUTDOWN: shutdown_exit,
    ExitReason.SYSTEM_EVENT: system_event_exit,
    ExitReason.FAIL_ENTRY: fail_entry_exit,
    ExitReason.INTERNAL_ERROR: internal_error_exit,
    ExitReason.INTR: intr_exit,
    ExitReason.IRQ_WINDOW_OPEN: ignore_exit,
    ExitReason.NMI: ignore_exit,
    ExitReason.HYPERCALL: hypercall_exit,
}


def handle_exit(reason: int, mm: RunBuffer, ctx: ExitContext) -> ExitAction:
    """Run the handler for ``reason`` on ``kvm_run`` contents ``mm``."""
    return HANDLERS.get(reason, unexpected_exit)(mm, ctx)
