"""The ``null`` back-end: output is discarded, there is never input."""

from __future__ import annotations

from pyvmm.chardev.base import CharBackendBase


class NullBackend(CharBackendBase):
    def __init__(self, label: str = "serial0") -> None:
        super().__init__(label, None)

    def write(self, data: bytes) -> int:
        return len(data)
