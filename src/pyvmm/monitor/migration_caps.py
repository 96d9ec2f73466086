"""Migration capabilities: ``query-migrate-capabilities`` and ``migrate-set-capabilities``.

pyvmm cannot migrate yet, so the table holds only what is true without migration:

* ``events``: send MIGRATION / MIGRATION_PASS events when a migration changes state.  pyvmm
  never starts one, so none is ever sent, whatever the setting; libvirt turns it on at every
  domain start and needs the answer to be a success.

The migration work will add its capabilities here (each with the code that honours it); a
capability not in :data:`CAPABILITIES` is refused with QEMU's error text.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pyvmm.monitor import schema
from pyvmm.monitor.errors import QmpError

if TYPE_CHECKING:
    from pyvmm.monitor.commands import Command

#: capability name -> what it means in pyvmm (documentation, and the enum query-qmp-schema lists).
CAPABILITIES: dict[str, str] = {
    "events": "MIGRATION events on state changes (pyvmm starts no migration, so it sends none)",
}


class CapabilityStates:
    """The current setting of each capability (one VM per process: process-wide)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = dict.fromkeys(CAPABILITIES, False)

    def query(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"capability": name, "state": on} for name, on in self._state.items()]

    def set(self, items: list[Any]) -> None:
        """All or nothing, as QEMU: every entry is checked before any is applied."""
        changes: dict[str, bool] = {}
        for i, item in enumerate(items):
            where = f"capabilities[{i}]"
            if not isinstance(item, dict):
                raise QmpError(f"Invalid parameter type for '{where}', expected: object")
            for key in item:
                if key not in ("capability", "state"):
                    raise QmpError(f"Parameter '{where}.{key}' is unexpected")
            cap, state = item.get("capability"), item.get("state")
            if cap is None:
                raise QmpError(f"Parameter '{where}.capability' is missing")
            if state is None:
                raise QmpError(f"Parameter '{where}.state' is missing")
            if not isinstance(cap, str) or cap not in CAPABILITIES:
                raise QmpError(f"Parameter '{where}.capability' does not accept value '{cap}'")
            if not isinstance(state, bool):
                raise QmpError(f"Invalid parameter type for '{where}.state', expected: boolean")
            changes[cap] = state
        with self._lock:
            self._state.update(changes)

    def enabled(self, name: str) -> bool:
        with self._lock:
            return self._state.get(name, False)


STATES = CapabilityStates()

schema.register_type(schema.EnumType("MigrationCapability", tuple(CAPABILITIES)))


def _query(ctx: Any, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    return STATES.query()


def _set(ctx: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    STATES.set(args["capabilities"])
    return {}


def commands() -> list[Command]:
    from pyvmm.monitor.commands import Command, Param

    return [
        Command("query-migrate-capabilities", _query, returns="[MigrationCapabilityStatus]"),
        Command("migrate-set-capabilities", _set,
                (Param("capabilities", "array", required=True, schema_type="[MigrationCapabilityStatus]"),)),
    ]
