"""QMP error classes.

QMP reports every failure as ``{"error": {"class": CLASS, "desc": TEXT}}``.
Only a handful of classes exist (QEMU's ``QapiErrorClass``); clients such as
libvirt branch on the class, humans read the text, so both follow QEMU.
"""

from __future__ import annotations

import enum


class ErrorClass(enum.StrEnum):
    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpError(Exception):
    """A command failed; becomes the ``error`` member of the reply."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_json(self) -> dict[str, str]:
        return {"class": str(self.error_class), "desc": self.desc}


def command_not_found(desc: str) -> QmpError:
    return QmpError(desc, ErrorClass.COMMAND_NOT_FOUND)
