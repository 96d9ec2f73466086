"""The QMP command table.

Each command names its parameters with JSON types, so argument checking
(and its error texts, which follow QEMU's) happens once, before the handler
runs.  Handlers get a :class:`CommandContext` and the checked arguments, and
return the JSON value of ``"return"`` or raise :class:`QmpError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pyvmm import __version__, sandbox
from pyvmm.monitor import block_commands, hmp
from pyvmm.monitor.control import ChardevInfo, MachineControl
from pyvmm.monitor.errors import QmpError, command_not_found
from pyvmm.monitor.events import Event, make_event
from pyvmm.runstate import RunState

log = logging.getLogger(__name__)

#: JSON type names QEMU uses in "Invalid parameter type" errors, and the Python types they accept.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


@dataclass(frozen=True)
class Param:
    name: str
    json_type: str
    required: bool = False
    #: The QAPI type query-qmp-schema names for it ("str", "[str]", an enum...); "" derives it from json_type.
    schema_type: str = ""

    def check(self, value: object) -> None:
        ok = isinstance(value, _JSON_TYPES[self.json_type])
        if self.json_type == "int" and isinstance(value, bool):
            ok = False
        if not ok:
            raise QmpError(f"Invalid parameter type for '{self.name}', expected: {self.json_type}")


class Session(Protocol):
    """The client connection a command arrived on."""

    negotiated: bool


class CommandContext(Protocol):
    @property
    def machine(self) -> MachineControl: ...

    @property
    def session(self) -> Session: ...

    def broadcast(self, event: dict[str, Any]) -> None:
        """Send an event to every negotiated client."""
        ...

    def monitor_chardevs(self) -> list[ChardevInfo]:
        """The monitor's own sockets, for query-chardev."""
        ...


Handler = Callable[[CommandContext, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    params: tuple[Param, ...] = ()
    #: The QAPI type of its "return" value, for query-qmp-schema ("any" when not described).
    returns: str = "any"

    def check_args(self, args: Mapping[str, Any]) -> None:
        known = {p.name: p for p in self.params}
        for key, value in args.items():
            param = known.get(key)
            if param is None:
                raise QmpError(f"Parameter '{key}' is unexpected")
            param.check(value)
        for p in self.params:
            if p.required and p.name not in args:
                raise QmpError(f"Parameter '{p.name}' is missing")


#: The QEMU interface level pyvmm's command line and QMP follow (docs/qemu-compat.md): clients that
#: gate features on QEMU's version (libvirt wants 4.2.0 or later) read this; ``package`` says pyvmm.
QEMU_INTERFACE_LEVEL = (7, 2, 0)


def version_info() -> dict[str, Any]:
    """``query-version``'s value; the greeting carries it too."""
    major, minor, micro = QEMU_INTERFACE_LEVEL
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"pyvmm {__version__}"}


# -- handlers ------------------------------------------------------------------------------------

def _qmp_capabilities(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    if ctx.session.negotiated:
        raise command_not_found("Capabilities negotiation is already complete, command ignored")
    for cap in args.get("enable", []):
        raise QmpError(f"Capability '{cap}' not available")
    ctx.session.negotiated = True
    return {}


def _query_status(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    state = ctx.machine.status()
    return {"status": state.value, "singlestep": False, "running": state is RunState.RUNNING}


def _query_version(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    return version_info()


def _query_commands(ctx: CommandContext, args: Mapping[str, Any]) -> list:
    return [{"name": name} for name in COMMANDS]


def _query_cpus_fast(ctx: CommandContext, args: Mapping[str, Any]) -> list:
    return [{"cpu-index": c.index, "qom-path": c.qom_path, "thread-id": c.thread_id, "target": c.target,
             "props": {"socket-id": c.socket_id, "core-id": c.core_id, "thread-id": c.thread_in_core}}
            for c in ctx.machine.cpus()]


def _query_chardev(ctx: CommandContext, args: Mapping[str, Any]) -> list:
    devs = [*ctx.machine.chardevs(), *ctx.monitor_chardevs()]
    return [{"label": d.label, "filename": d.filename, "frontend-open": d.frontend_open} for d in devs]


def _query_name(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    name = ctx.machine.guest_name()
    return {} if name is None else {"name": name}


def _query_uuid(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    return {"UUID": ctx.machine.guest_uuid() or "00000000-0000-0000-0000-000000000000"}


def _stop(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    ctx.machine.pause()
    return {}


def _cont(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    state = ctx.machine.status()
    if state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
        raise QmpError("Resetting the Virtual Machine is required")
    ctx.machine.resume()
    return {}


def _system_reset(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    ctx.machine.system_reset()
    return {}


def _system_powerdown(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    ctx.machine.system_powerdown()
    ctx.broadcast(make_event(Event.POWERDOWN))
    return {}


def _quit(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    ctx.machine.quit()
    return {}


def _send_key(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    """QEMU's send-key: ``keys`` is a list of ``{"type": "qcode", "data": NAME}``, pressed together.
    ``hold-time`` is accepted; the keys are released at once (the guest sees the same key sequence)."""
    known = ctx.machine.key_names()
    qcodes = []
    for i, key in enumerate(args["keys"]):
        if not isinstance(key, dict):
            raise QmpError(f"Invalid parameter type for 'keys[{i}]', expected: object")
        if "type" not in key:
            raise QmpError("Parameter 'type' is missing")
        if key["type"] == "number":
            raise QmpError("pyvmm's send-key takes key names (type qcode) only")
        if key["type"] != "qcode":
            raise QmpError(f"Parameter 'type' does not accept value '{key['type']}'")
        data = key.get("data")
        if not isinstance(data, str) or data not in known:
            raise QmpError(f"Parameter 'data' does not accept value '{data}'")
        qcodes.append(data)
    ctx.machine.send_keys(qcodes)
    return {}


def _human_monitor_command(ctx: CommandContext, args: Mapping[str, Any]) -> str:
    return hmp.execute(args["command-line"], ctx.machine, args.get("cpu-index", 0), ctx.monitor_chardevs())


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("qmp_capabilities", _qmp_capabilities, (Param("enable", "array"),)),
    Command("query-status", _query_status),
    Command("query-version", _query_version),
    Command("query-commands", _query_commands),
    Command("query-cpus-fast", _query_cpus_fast),
    Command("query-block", block_commands.query_block),
    Command("query-named-block-nodes", block_commands.query_named_block_nodes, (Param("flat", "boolean"),)),
    Command("query-blockstats", block_commands.query_blockstats, (Param("query-nodes", "boolean"),)),
    Command("query-block-jobs", block_commands.query_block_jobs),
    Command("query-chardev", _query_chardev),
    Command("query-name", _query_name),
    Command("query-uuid", _query_uuid),
    Command("stop", _stop),
    Command("cont", _cont),
    Command("system_reset", _system_reset),
    Command("system_powerdown", _system_powerdown),
    Command("quit", _quit),
    Command("send-key", _send_key, (Param("keys", "array", required=True), Param("hold-time", "int"))),
    Command("human-monitor-command", _human_monitor_command,
            (Param("command-line", "string", required=True), Param("cpu-index", "int"))),
)}


def _probe_commands() -> list[Command]:
    """The commands of their own modules (QOM introspection, the schema, fd passing)."""
    from pyvmm.monitor import fdpass, qom, schema

    return [*qom.commands(), *schema.commands(), *fdpass.commands()]


COMMANDS.update((c.name, c) for c in _probe_commands())


def _x_test_syscall(ctx: CommandContext, args: Mapping[str, Any]) -> dict:
    """Test-only (``PYVMM_TEST_HOOKS=1``): make a system call that ``-sandbox on`` forbids."""
    try:
        return {"result": sandbox.attempt(args["call"], args.get("path", ""))}
    except (OSError, ValueError) as e:
        raise QmpError(f"{args['call']}: {e}") from None


if sandbox.test_hooks_enabled():
    COMMANDS["x-pyvmm-test-syscall"] = Command("x-pyvmm-test-syscall", _x_test_syscall,
                                               (Param("call", "string", required=True), Param("path", "string")))

def _register_migration_commands() -> None:
    from pyvmm.monitor import migration_commands

    for cmd in migration_commands.COMMANDS:
        COMMANDS[cmd.name] = cmd


_register_migration_commands()

#: The only command a client may send before negotiating capabilities.
NEGOTIATION_COMMAND = "qmp_capabilities"


def lookup(name: str, negotiated: bool) -> Command:
    """The command called ``name``, or the CommandNotFound error QEMU gives for it."""
    if not negotiated and name != NEGOTIATION_COMMAND:
        raise command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'")
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise command_not_found(f"The command {name} has not been found")
    return cmd
