"""The QGA client's errors, all :class:`pyvmm.errors.PyvmmError`."""

from __future__ import annotations

from pyvmm.errors import PyvmmError


class QgaError(PyvmmError):
    """The guest agent could not be reached or spoke something that is not QGA."""


class QgaTimeout(QgaError):
    """The agent did not answer in time (not running yet, or the guest is stuck)."""


class QgaCommandError(QgaError):
    """The agent answered a command with an error (QMP's ``{"error": {"class", "desc"}}``)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc
