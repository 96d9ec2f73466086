"""QMP's migration commands, with QEMU's names, arguments and errors: ``migrate``,
``migrate_cancel``, ``query-migrate``, ``migrate-set-capabilities``, ``migrate-set-parameters``,
``query-migrate-parameters``, ``query-migrate-capabilities`` and ``migrate-incoming``.
They are registered after the table of commands.py, so they replace any placeholder there.
The work is done by the machine's :class:`pyvmm.migration.manager.MigrationManager`; a
migration runs in its own thread, so ``migrate`` returns at once and ``query-migrate`` follows it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyvmm.errors import PyvmmError
from pyvmm.monitor.commands import Command, CommandContext, Param
from pyvmm.monitor.errors import QmpError
from pyvmm.runstate import RunState


def migration_of(ctx: CommandContext) -> Any:
    """The machine's migration manager (machine/pc_migration.py), or a refusal (``-machine none``)."""
    mig = getattr(ctx.machine, "migration", None)
    if mig is None:
        raise QmpError("migration is not available on this machine")
    return mig.manager


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except PyvmmError as e:
        raise QmpError(str(e)) from None


def _migrate(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    for flag in ("blk", "inc"):
        if args.get(flag):
            raise QmpError(f"pyvmm cannot honour migrate's '{flag}' (block migration): use shared storage")
    if args.get("resume"):
        raise QmpError("Cannot resume if there is no paused migration")
    mgr = migration_of(ctx)
    state = ctx.machine.status()
    if state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
        raise QmpError("Cannot migrate a guest that has shut down")
    _call(mgr.migrate, args["uri"], state is RunState.INMIGRATE)
    return {}


def _migrate_cancel(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    migration_of(ctx).cancel()
    return {}


def _query_migrate_capabilities(ctx: CommandContext, args: Mapping[str, Any]) -> list:
    if getattr(ctx.machine, "migration", None) is None:  # -machine none (libvirt's probe asks): all off
        from pyvmm.migration.manager import CAPABILITIES

        return [{"capability": name, "state": False} for name in CAPABILITIES]
    return migration_of(ctx).query_capabilities()  # type: ignore[no-any-return]


def _query_migrate(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    return migration_of(ctx).query()  # type: ignore[no-any-return]


def _set_capabilities(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    _call(migration_of(ctx).set_capabilities, args["capabilities"])
    return {}


def _set_parameters(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    _call(migration_of(ctx).set_parameters, dict(args))
    return {}


def _query_parameters(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    return migration_of(ctx).params.query()  # type: ignore[no-any-return]


def _migrate_incoming(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    _call(migration_of(ctx).start_incoming, args["uri"])
    return {}


COMMANDS = [
    Command("migrate", _migrate, (Param("uri", "string", required=True), Param("blk", "boolean"),
                                  Param("inc", "boolean"), Param("detach", "boolean"), Param("resume", "boolean"))),
    Command("migrate_cancel", _migrate_cancel),
    Command("query-migrate", _query_migrate),
    Command("migrate-set-capabilities", _set_capabilities, (Param("capabilities", "array", required=True),)),
    Command("migrate-set-parameters", _set_parameters, (Param("downtime-limit", "int"), Param("max-bandwidth", "int"))),
    Command("query-migrate-parameters", _query_parameters),
    Command("migrate-incoming", _migrate_incoming, (Param("uri", "string", required=True),)),
    Command("query-migrate-capabilities", _query_migrate_capabilities),
]
