"""The ``pty`` back-end: the guest console on a new pseudo-terminal.

The slave's path is logged the way QEMU prints it ("char device redirected
to /dev/pts/5 (label serial0)") and kept in :attr:`PtyBackend.path`; connect
with ``screen``/``minicom``/``picocom``.  The slave is put in raw mode and we
keep our own slave fd open, so the master never reports a hang-up between
clients.  The master is non-blocking: when nobody reads, the kernel buffer
fills and further output is dropped instead of stalling the vCPU.
"""

from __future__ import annotations

import logging
import os
import termios
import tty

from pyvmm.chardev.base import CharBackendBase, write_bounded
from pyvmm.errors import DeviceError
from pyvmm.loop import MainLoop

log = logging.getLogger(__name__)

#: How long one write may wait for a reader that is present but slow.
WRITE_TIMEOUT = 0.05


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
        self._stalled = False
        log.info("char device redirected to %s (label %s)", self.path, label)

    def write(self, data: bytes) -> int:
        if self._closed:
            return 0
        try:
            # Once output has been dropped, don't wait again until the reader catches up.
            n = write_bounded(self.master_fd, data, 0.0 if self._stalled else WRITE_TIMEOUT)
        except OSError as e:
            log.debug("%s: pty write failed: %s", self.label, e)
            return 0
        self._stalled = n < len(data)
        return n

    def _on_attach(self) -> None:
        self._start_input(self.master_fd)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        os.close(self.master_fd)
        os.close(self._slave_fd)
