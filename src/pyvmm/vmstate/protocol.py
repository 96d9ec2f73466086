"""What a device implements to be saved and restored."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from pyvmm.errors import PyvmmError


class VmStateError(PyvmmError):
    """A stream that cannot be written or read; the message is one line for the user."""


@runtime_checkable
class Stateful(Protocol):
    """A device whose state goes into the stream.

    ``save_state`` returns plain data (see :mod:`pyvmm.vmstate.codec`) and is called with the
    vCPUs stopped; ``load_state`` gets what a ``save_state`` of section version ``version``
    returned (never newer than ``vmstate_version``) and raises :class:`VmStateError` for data it
    cannot use.
    """

    vmstate_version: int

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any], version: int) -> None: ...
