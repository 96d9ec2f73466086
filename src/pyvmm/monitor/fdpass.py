"""File descriptors passed over the monitor socket: ``getfd``, ``closefd``, ``add-fd``.

Placeholder filled in below."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmm.monitor.commands import Command


def commands() -> list[Command]:
    return []
