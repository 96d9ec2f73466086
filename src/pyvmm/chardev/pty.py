"""The ``pty`` back-end: the guest console on a new pseudo-terminal.

The slave's path is logged the way QEMU prints it ("char device redirected
to /dev/pts/5 (label serial0)") and kept in :attr:`PtyBackend.path`; connect
with ``screen``/``minicom``/``picocom``.  The slave is put in raw mode and we
keep our own slave fd open, so the master never reports a hang-up between
clients.  The master is non-blocking: output the reader has not taken yet
is queued (bounded) and flushed by the loop; when nobody reads at all the
queue fills and further output is dropped instead of stalling the vCPU.
"""

from __future__ import annotations

import logging
import os
import termios
import tty

from pyvmm.chardev.base import CharBackendBase, OutputBuffer
from pyvmm.errors import DeviceError
from pyvmm.loop import MainLoop

log = logging.getLogger(__name__)


class PtyBackend(CharBackendBase):
    def __init__(self, loop: MainLoop, label: str = "serial0") -> None:
        super().__init__(label, loop)
        try:
            self.master_fd, self._slave_fd = os.openpty()
        except OSError as e:
            raise DeviceError(f"chardev {label}: cannot open a pty: {e.strerror}") from None
        os.set_blocking(self.master_fd, False)
        tty.setraw(self._slave_fd, termios.TCSANOW)
        self.path = os.ttyname(self._slave_fd)
        self._out = OutputBuffer(loop, label)
        self._out.set_target(self.master_fd, lambda d: os.write(self.master_fd, d), self._on_write_error)
        log.info("char device redirected to %s (label %s)", self.path, label)

    def write(self, data: bytes) -> int:
        if self._closed:
            return 0
        return self._out.write(data)

    def _on_write_error(self, err: OSError) -> None:
        log.warning("%s: pty write failed (%s); output is now discarded", self.label, err)
        self._out.clear_target()

    def _on_attach(self) -> None:
        self._start_input(self.master_fd)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._out.clear_target()
        os.close(self.master_fd)
        os.close(self._slave_fd)
