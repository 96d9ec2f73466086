"""The public API's errors: every one is a :class:`pyvmm.errors.PyvmmError`."""

from __future__ import annotations

from pyvmm.errors import PyvmmError
from pyvmm.qga.errors import QgaCommandError, QgaError, QgaTimeout


class VMError(PyvmmError):
    """The VM could not be started, or an operation on it failed."""


class VMTimeout(VMError, TimeoutError):
    """A wait on the VM (boot, a command, an event, its exit) ran out of time."""


class QMPError(VMError):
    """A QMP command failed: the monitor's ``{"error": {"class", "desc"}}``."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


__all__ = ["QMPError", "QgaCommandError", "QgaError", "QgaTimeout", "VMError", "VMTimeout"]
