"""``query-qmp-schema``: the QAPI introspection of exactly what this monitor implements.

The schema is generated from the command table (:data:`pyvmm.monitor.commands.COMMANDS`: each
command's parameters and return type), the events pyvmm emits (:data:`EVENTS`) and the types
they name (:data:`TYPES`), in QEMU's ``SchemaInfo`` shape: one entity per command, event,
object, enum, array and builtin type, each naming the others by ``name``.  Clients such as
libvirt walk it by path (``blockdev-add/arg-type/+file/...``) to decide what the VMM can do, so
nothing is listed that pyvmm lacks: a client that looks for ``blockdev-add`` finds no such
command here.  QEMU hides its internal type names behind numbers; pyvmm keeps readable names
(``q_obj_NAME-arg``), which clients must not rely on either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyvmm.monitor.commands import Command

#: QAPI's builtin types, as ``SchemaInfoBuiltin`` names them (``json-type`` member).
BUILTINS: dict[str, str] = {"str": "string", "int": "int", "bool": "boolean", "number": "number",
                            "any": "value", "null": "null"}
#: commands.Param's JSON type -> its QAPI type when the parameter does not say.
_JSON_TO_QAPI = {"string": "str", "int": "int", "boolean": "bool", "array": "[any]", "object": "any"}


@dataclass(frozen=True)
class Member:
    name: str
    type: str
    optional: bool = False


@dataclass(frozen=True)
class ObjectType:
    name: str
    members: tuple[Member, ...] = ()


@dataclass(frozen=True)
class EnumType:
    name: str
    values: tuple[str, ...]


#: Named types commands and events refer to (enums and objects); arrays ``[T]`` are derived.
TYPES: dict[str, ObjectType | EnumType] = {t.name: t for t in (
    EnumType("RunState", ("debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
                          "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
                          "suspended", "watchdog", "guest-panicked", "colo")),
    EnumType("ShutdownCause", ("none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
                               "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset",
                               "snapshot-load")),
    EnumType("GuestPanicAction", ("pause", "poweroff", "run")),
    ObjectType("StatusInfo", (Member("running", "bool"), Member("singlestep", "bool"), Member("status", "RunState"))),
    ObjectType("VersionTriple", (Member("major", "int"), Member("minor", "int"), Member("micro", "int"))),
    ObjectType("VersionInfo", (Member("qemu", "VersionTriple"), Member("package", "str"))),
    ObjectType("CommandInfo", (Member("name", "str"),)),
    ObjectType("NameInfo", (Member("name", "str", optional=True),)),
    ObjectType("UuidInfo", (Member("UUID", "str"),)),
    ObjectType("ChardevInfo", (Member("label", "str"), Member("filename", "str"), Member("frontend-open", "bool"))),
    ObjectType("CpuInstanceProperties", (Member("socket-id", "int", True), Member("core-id", "int", True),
                                         Member("thread-id", "int", True))),
    ObjectType("CpuInfoFast", (Member("cpu-index", "int"), Member("qom-path", "str"), Member("thread-id", "int"),
                               Member("props", "CpuInstanceProperties", True), Member("target", "str"))),
    ObjectType("TargetInfo", (Member("arch", "str"),)),
    ObjectType("KvmInfo", (Member("enabled", "bool"), Member("present", "bool"))),
    ObjectType("ObjectTypeInfo", (Member("name", "str"), Member("abstract", "bool", True),
                                  Member("parent", "str", True))),
    ObjectType("ObjectPropertyInfo", (Member("name", "str"), Member("type", "str"),
                                      Member("description", "str", True), Member("default-value", "any", True))),
    ObjectType("MachineInfo", (Member("name", "str"), Member("alias", "str", True), Member("is-default", "bool", True),
                               Member("cpu-max", "int"), Member("hotpluggable-cpus", "bool"),
                               Member("numa-mem-supported", "bool"), Member("deprecated", "bool"),
                               Member("default-cpu-type", "str", True))),
    ObjectType("CommandLineParameterInfo", (Member("name", "str"), Member("type", "str"),
                                            Member("help", "str", True), Member("default", "str", True))),
    ObjectType("CommandLineOptionInfo", (Member("option", "str"), Member("parameters", "[CommandLineParameterInfo]"))),
    ObjectType("AddfdInfo", (Member("fdset-id", "int"), Member("fd", "int"))),
    ObjectType("SchemaInfo", (Member("name", "str"), Member("meta-type", "str"))),
)}

#: The events pyvmm sends and their data members.
EVENTS: dict[str, tuple[Member, ...]] = {
    "SHUTDOWN": (Member("guest", "bool"), Member("reason", "ShutdownCause")),
    "POWERDOWN": (),
    "RESET": (Member("guest", "bool"), Member("reason", "ShutdownCause")),
    "STOP": (),
    "RESUME": (),
    "GUEST_PANICKED": (Member("action", "GuestPanicAction"),),
    "GUEST_CRASHLOADED": (Member("action", "GuestPanicAction"),),
    "MIGRATION": (Member("status", "str"),),
    "MIGRATION_PASS": (Member("pass", "int"),),
}


def register_type(t: ObjectType | EnumType) -> None:
    """Add a named type (a module that adds commands declares the types they use)."""
    TYPES[t.name] = t


class _Builder:
    def __init__(self) -> None:
        self.out: list[dict[str, Any]] = []
        self.done: set[str] = set()

    def type(self, name: str) -> str:
        """Emit ``name`` (and what it refers to) once; return its name."""
        if name in self.done:
            return name
        self.done.add(name)
        if name.startswith("[") and name.endswith("]"):
            element = self.type(name[1:-1])
            self.out.append({"name": name, "meta-type": "array", "element-type": element})
        elif name in BUILTINS:
            self.out.append({"name": name, "meta-type": "builtin", "json-type": BUILTINS[name]})
        elif isinstance(t := TYPES.get(name), EnumType):
            self.out.append({"name": name, "meta-type": "enum", "values": list(t.values),
                             "members": [{"name": v} for v in t.values]})
        elif isinstance(t, ObjectType):
            self.object(name, t.members)
        else:
            raise KeyError(f"query-qmp-schema: type {name} is not declared")
        return name

    def object(self, name: str, members: Iterable[Member]) -> str:
        self.done.add(name)
        listed = []
        for m in members:
            entry: dict[str, Any] = {"name": m.name, "type": self.type(m.type)}
            if m.optional:
                entry["default"] = None
            listed.append(entry)
        self.out.append({"name": name, "meta-type": "object", "members": listed})
        return name


def param_type(json_type: str, schema_type: str) -> str:
    return schema_type or _JSON_TO_QAPI[json_type]


def build(commands: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The SchemaInfo list for ``commands`` (name -> commands.Command) and :data:`EVENTS`."""
    b = _Builder()
    b.object("q_empty", ())
    for name, cmd in commands.items():
        arg_type = "q_empty"
        if cmd.params:
            arg_type = b.object(f"q_obj_{name}-arg", (Member(p.name, param_type(p.json_type, p.schema_type),
                                                             optional=not p.required) for p in cmd.params))
        ret = b.type(cmd.returns)
        b.out.append({"name": name, "meta-type": "command", "arg-type": arg_type, "ret-type": ret})
    for name, members in EVENTS.items():
        arg_type = b.object(f"q_obj_{name}-arg", members) if members else "q_empty"
        b.out.append({"name": name, "meta-type": "event", "arg-type": arg_type})
    return b.out


def _query_qmp_schema(ctx: Any, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    from pyvmm.monitor.commands import COMMANDS

    return build(COMMANDS)


def commands() -> list[Command]:
    from pyvmm.monitor.commands import Command

    return [Command("query-qmp-schema", _query_qmp_schema, returns="[SchemaInfo]")]
