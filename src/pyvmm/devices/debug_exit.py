"""QEMU's ``isa-debug-exit``: a guest-triggered process exit, for tests.

A write of ``v`` (any width) to the port range makes pyvmm exit with status
``(v << 1) | 1`` -- always odd, so a test guest's result can never be
confused with a clean 0 exit.  Only the low 8 bits survive as a process
status (as with QEMU's ``exit()``), so that is what is posted.  The request
goes through the :class:`VmControl` mailbox; the main thread does the
exiting.  Reads return 0.

Locking: the device has no mutable state besides a counter for tests;
``VmControl`` is itself thread-safe, so no lock is needed.
"""

from __future__ import annotations

import logging

from pyvmm.qdev import BusKind, DeviceContext, DeviceProps, DeviceType, Prop, PropType
from pyvmm.runstate import VmControl
from pyvmm.x86 import layout

log = logging.getLogger(__name__)

DEBUG_EXIT_IO_SIZE = 4


class DebugExit:
    vmstate_stateless = True  # nothing to migrate (VM state): a write ends the run

    def __init__(self, control: VmControl) -> None:
        self._control = control
        self.last_value: int | None = None

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.last_value = value
        status = ((value << 1) | 1) & 0xFF
        log.debug("isa-debug-exit: value %#x -> exit status %d", value, status)
        self._control.request_exit(status, f"isa-debug-exit wrote {value:#x}")

    def reset(self) -> None:
        pass


def _create(ctx: DeviceContext, props: DeviceProps) -> DebugExit:
    dev = DebugExit(ctx.control)
    ctx.add_io(props.get_int("iobase"), props.get_int("iosize"), dev, props.name("isa-debug-exit"))
    return dev


DEVICE_TYPES = [DeviceType(
    "isa-debug-exit", BusKind.ISA, _create,
    (Prop("iobase", PropType.UINT32, layout.DEBUG_EXIT_PORT), Prop("iosize", PropType.UINT32, DEBUG_EXIT_IO_SIZE)),
    "a guest write ends the VMM with status (value << 1) | 1")]
