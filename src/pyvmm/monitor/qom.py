"""What the VMM is: QOM type and property introspection, machines, accelerators, options.

These are the commands a management tool asks before it starts a VM (libvirt's capability
probe): ``query-target``, ``query-kvm``, ``qom-list-types``, ``device-list-properties``,
``qom-list-properties``, ``query-machines``, ``query-command-line-options``, and ``qom-list``
for a running machine's composition tree.  Device types and their properties come from the
device registry (:mod:`pyvmm.qdev`), so a device pyvmm lacks is never listed; the rest are
pyvmm's own QOM types: its two accelerators, its two machine types, its chardev back-ends and
the ``secret`` object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyvmm.memory_options import BACKEND_KINDS
from pyvmm.monitor.errors import ErrorClass, QmpError

if TYPE_CHECKING:
    from pyvmm.monitor.commands import Command
    from pyvmm.qdev import DeviceType


@dataclass(frozen=True)
class QomType:
    name: str
    parent: str | None
    abstract: bool = False
    #: (name, QOM property type, description)
    props: tuple[tuple[str, str, str], ...] = ()


_MACHINE_PROPS = (
    ("type", "string", ""),
    ("accel", "string", "Accelerator list, e.g. kvm:tcg"),
    ("acpi", "OnOffAuto", "Enable ACPI"),
    ("usb", "bool", "Set on/off to enable/disable usb (pyvmm: off only)"),
    ("dump-guest-core", "bool", "Include guest memory in a core dump (pyvmm: off only)"),
    ("vmport", "OnOffAuto", "Enable vmport (pyvmm: off only)"),
    ("hpet", "bool", "Enable HPET (pyvmm: off only)"),
    ("smm", "OnOffAuto", "Enable SMM (pyvmm: off only)"),
    ("sata", "bool", "Enable SATA (pyvmm: off only)"),
    ("graphics", "bool", "Set on/off to enable/disable graphics emulation (pyvmm: off only)"),
    ("pit", "bool", "Enable i8254 PIT (pyvmm: on only)"),
)

_MEMORY_BACKEND_PROPS = (("size", "int", "Size of the memory region (ex: 500M)"),
                         ("share", "bool", "Mark the memory as private to QEMU or shared"),
                         ("prealloc", "bool", "Preallocate memory"),
                         ("mem-path", "string", "File to back the memory (memory-backend-file)"))

#: pyvmm's own QOM types (devices come from the registry).
OWN_TYPES: tuple[QomType, ...] = (
    QomType("object", None, abstract=True),
    QomType("device", "object", abstract=True),
    QomType("sys-bus-device", "device", abstract=True),
    QomType("isa-device", "device", abstract=True),
    QomType("pci-device", "device", abstract=True),
    QomType("virtio-device", "device", abstract=True),
    # The board's ACPI power-management function: S3 and S4 are always disabled (its tables offer S5 only),
    # which -global PIIX4_PM.disable_s3=1 / disable_s4=1 state (pyvmm.compat_options).
    QomType("PIIX4_PM", "pci-device", props=(("disable_s3", "uint8", "1 only: no S3 sleep state"),
                                             ("disable_s4", "uint8", "1 only: no S4 sleep state"))),
    QomType("machine", "object", abstract=True),
    QomType("pc-machine", "machine", props=_MACHINE_PROPS),
    QomType("none-machine", "machine", props=(("type", "string", ""),
                                              ("accel", "string", "Accelerator list, e.g. kvm:tcg"))),
    QomType("accel", "object", abstract=True),
    QomType("kvm-accel", "accel", props=(("kernel-irqchip", "on|off|split", "Configure KVM in-kernel irqchip"),)),
    QomType("tcg-accel", "accel", props=(("thread", "string", "single only (one vCPU engine runs at a time)"),)),
    QomType("chardev", "object", abstract=True),
    *(QomType(f"chardev-{kind}", "chardev") for kind in ("socket", "file", "stdio", "pty", "null")),
    QomType("memory-backend", "object", abstract=True),
    *(QomType(name, "memory-backend", props=_MEMORY_BACKEND_PROPS) for name in BACKEND_KINDS),
    QomType("secret_common", "object", abstract=True),
    QomType("secret", "secret_common", props=(("data", "string", "the secret, inline"),
                                              ("file", "string", "a file holding the secret"),
                                              ("format", "QCryptoSecretFormat", "raw or base64"))),
)

_BUS_PARENT = {"System": "sys-bus-device", "ISA": "isa-device", "PCI": "pci-device", "virtio-bus": "virtio-device"}


def _registry_types() -> list[DeviceType]:
    from pyvmm.devices import device_registry

    return device_registry().types()


def all_types() -> dict[str, QomType]:
    types = {t.name: t for t in OWN_TYPES}
    for t in _registry_types():
        types[t.name] = QomType(t.name, _BUS_PARENT.get(t.bus.value, "device"),
                                props=tuple((p.name, p.type.qemu_type, p.description) for p in t.props))
    return types


def _is_a(types: Mapping[str, QomType], name: str, ancestor: str) -> bool:
    seen = 0
    cur: str | None = name
    while cur is not None and seen < 32:
        if cur == ancestor:
            return True
        t = types.get(cur)
        cur = t.parent if t else None
        seen += 1
    return False


def _props_json(t: QomType) -> list[dict[str, Any]]:
    out = []
    for name, kind, desc in t.props:
        entry: dict[str, Any] = {"name": name, "type": kind}
        if desc:
            entry["description"] = desc
        out.append(entry)
    return out


# -- handlers --------------------------------------------------------------------------------------

def _query_target(ctx: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    return {"arch": "x86_64"}


def _query_kvm(ctx: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """present: /dev/kvm can be opened; enabled: this VM's vCPUs run on KVM (not tcg)."""
    accel = getattr(ctx.machine, "accelerator", None)
    name = accel() if callable(accel) else None
    return {"enabled": name == "kvm", "present": os.access("/dev/kvm", os.R_OK | os.W_OK)}


def _qom_list_types(ctx: Any, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    types = all_types()
    implements = args.get("implements")
    want_abstract = args.get("abstract", False)
    out = []
    for t in types.values():
        if t.abstract and not want_abstract:
            continue
        if implements is not None and not _is_a(types, t.name, implements):
            continue
        entry: dict[str, Any] = {"name": t.name}
        if t.abstract:
            entry["abstract"] = True
        if t.parent is not None:
            entry["parent"] = t.parent
        out.append(entry)
    return out


def _device_list_properties(ctx: Any, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    name = args["typename"]
    types = all_types()
    t = types.get(name)
    if t is None:
        from pyvmm.devices import device_registry

        dt = device_registry().get(name)  # an alias (virtio-blk -> virtio-blk-pci)
        t = types.get(dt.name) if dt is not None else None
    if t is None or not _is_a(types, t.name, "device"):
        raise QmpError(f"Device '{name}' not found", ErrorClass.DEVICE_NOT_FOUND)
    if t.abstract:
        raise QmpError("Parameter 'typename' expects a non-abstract device type")
    return _props_json(t)


def _qom_list_properties(ctx: Any, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    name = args["typename"]
    t = all_types().get(name)
    if t is None:  # (libvirt 9.0 crashes on this answer for memory-backend-file, which pyvmm has)
        raise QmpError(f"Class '{name}' not found", ErrorClass.DEVICE_NOT_FOUND)
    return _props_json(t)


def _query_machines(ctx: Any, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    from pyvmm.config import MAX_SMP

    return [{"name": "pc", "is-default": True, "cpu-max": MAX_SMP, "hotpluggable-cpus": False,
             "numa-mem-supported": False, "deprecated": False},
            {"name": "none", "cpu-max": 1, "hotpluggable-cpus": False, "numa-mem-supported": False,
             "deprecated": False}]


def _query_command_line_options(ctx: Any, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    from pyvmm.monitor.cmdline_options import command_line_options

    table = command_line_options()
    wanted = args.get("option")
    if wanted is not None:
        table = [o for o in table if o["option"] == wanted]
        if not table:
            raise QmpError(f"invalid option name: {wanted}")
    return table


def _qom_list(ctx: Any, args: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The composition tree: /machine, its containers and the devices in them."""
    path = args["path"].rstrip("/") or "/"
    tree = getattr(ctx.machine, "qom_devices", None)
    devices: list[tuple[str, str, list[tuple[str, str]]]] = tree() if callable(tree) else []
    containers = ("peripheral", "peripheral-anon", "unattached")
    if path == "/":
        return [{"name": "type", "type": "string"}, {"name": "machine", "type": "child<pc-machine>"}]
    if path == "/machine":
        return [{"name": "type", "type": "string"}] + [{"name": c, "type": "child<container>"} for c in containers]
    if path.startswith("/machine/") and path[len("/machine/"):] in containers:
        prefix = path + "/"
        return [{"name": "type", "type": "string"}] + [
            {"name": dpath[len(prefix):], "type": f"child<{driver}>"}
            for dpath, driver, _props in devices if dpath.startswith(prefix) and "/" not in dpath[len(prefix):]]
    for dpath, _driver, props in devices:
        if dpath == path:
            return [{"name": "type", "type": "string"}] + [{"name": n, "type": k} for n, k in props]
    raise QmpError(f"Device '{args['path']}' not found", ErrorClass.DEVICE_NOT_FOUND)


def commands() -> list[Command]:
    from pyvmm.monitor.commands import Command, Param

    return [
        Command("query-target", _query_target, returns="TargetInfo"),
        Command("query-kvm", _query_kvm, returns="KvmInfo"),
        Command("qom-list-types", _qom_list_types, (Param("implements", "string"), Param("abstract", "boolean")),
                returns="[ObjectTypeInfo]"),
        Command("device-list-properties", _device_list_properties, (Param("typename", "string", required=True),),
                returns="[ObjectPropertyInfo]"),
        Command("qom-list-properties", _qom_list_properties, (Param("typename", "string", required=True),),
                returns="[ObjectPropertyInfo]"),
        Command("query-machines", _query_machines, returns="[MachineInfo]"),
        Command("query-command-line-options", _query_command_line_options, (Param("option", "string"),),
                returns="[CommandLineOptionInfo]"),
        Command("qom-list", _qom_list, (Param("path", "string", required=True),), returns="[ObjectPropertyInfo]"),
    ]
