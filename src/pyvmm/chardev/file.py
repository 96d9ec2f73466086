"""The ``file:PATH`` back-end: guest output appended to a file, no input.

Like QEMU, the file is truncated when opened unless ``append=on``.  Writes
are ordinary blocking writes: a local file never stalls for long.
"""

from __future__ import annotations

import logging
import os

from pyvmm.chardev.base import CharBackendBase, write_blocking
from pyvmm.errors import DeviceError

log = logging.getLogger(__name__)


class FileBackend(CharBackendBase):
    """Output to a file; input is none (``attach`` is accepted and ignored)."""

    def __init__(self, path: str, label: str = "serial0", append: bool = False) -> None:
        super().__init__(label, None)
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise DeviceError(f"chardev {label}: cannot open {path}: {e.strerror}") from None
        self._failed = False

    def write(self, data: bytes) -> int:
        if self._closed or self._failed:
            return 0
        try:
            return write_blocking(self._fd, data)
        except OSError as e:
            self._failed = True
            log.warning("%s: writing %s failed (%s); output is now discarded", self.label, self.path, e)
            return 0

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        os.close(self._fd)
