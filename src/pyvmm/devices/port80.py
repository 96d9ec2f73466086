"""The POST-code port 0x80: firmware and kernels write progress codes (and
Linux uses it as an I/O delay).  Writes are remembered, reads return 0.

Locking: a single int attribute updated atomically under the GIL; the only
readers are tests and the monitor, so no lock is needed.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PORT80_BASE = 0x80
PORT80_IO_SIZE = 1


class Port80:
    def __init__(self, log_writes: bool = False) -> None:
        self.last_code: int | None = None
        self.writes = 0
        self._log_writes = log_writes

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.last_code = value
        self.writes += 1
        if self._log_writes:
            log.debug("POST code %#x", value)

    def reset(self) -> None:
        self.last_code = None
