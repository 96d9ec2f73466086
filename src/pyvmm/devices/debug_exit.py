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

from pyvmm.runstate import VmControl

log = logging.getLogger(__name__)

DEBUG_EXIT_BASE = 0xF4
DEBUG_EXIT_IO_SIZE = 4


class DebugExit:
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
