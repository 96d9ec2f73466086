"""``query-migrate-capabilities``: QEMU's list of migration capabilities and their state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyvmm.monitor.commands import Command, CommandContext
from pyvmm.monitor.errors import QmpError


def migration_of(ctx: CommandContext) -> Any:
    """The machine's migration manager, or the error QEMU's ``-machine none`` gives no reason for."""
    mig = getattr(ctx.machine, "migration", None)
    if mig is None:
        raise QmpError("migration is not available on this machine")
    return mig.manager


def _query_migrate_capabilities(ctx: CommandContext, args: Mapping[str, Any]) -> list:
    return migration_of(ctx).query_capabilities()  # type: ignore[no-any-return]


COMMANDS = [Command("query-migrate-capabilities", _query_migrate_capabilities)]
