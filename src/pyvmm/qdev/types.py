"""Device types: a QEMU driver name, the bus it plugs into, typed properties and a factory.

A virtio device is declared once, as a :class:`VirtioType`; it expands into one
:class:`DeviceType` per transport, QEMU's ``NAME-pci`` and ``NAME-device`` (virtio-mmio),
so the device model never knows its transport.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyvmm.errors import ConfigError
from pyvmm.qdev.context import DeviceContext
from pyvmm.qdev.props import Prop, PropType, convert
from pyvmm.qemuopts import Value


class BusKind(enum.Enum):
    """The bus a device plugs into, with QEMU's bus type names."""

    SYSTEM = "System"  # built into the board
    ISA = "ISA"
    PCI = "PCI"
    VIRTIO = "virtio-bus"
    VIRTIO_SERIAL = "virtio-serial-bus"  # virtserialport, virtconsole


class DeviceProps:
    """A device's properties after conversion, defaults filled in; plus its id and driver."""

    def __init__(self, driver: str, values: dict[str, object], ident: str | None = None) -> None:
        self.driver = driver
        self.id = ident
        self.values = values

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def get_int(self, key: str) -> int:
        value = self.values[key]
        assert isinstance(value, int)
        return value

    def get_str(self, key: str) -> str | None:
        value = self.values.get(key)
        assert value is None or isinstance(value, str)
        return value

    def get_bool(self, key: str) -> bool:
        return bool(self.values.get(key))

    def is_set(self, key: str) -> bool:
        return self.values.get(key) is not None

    def name(self, default: str) -> str:
        """What logs call the device: its id, else ``default``."""
        return self.id or default


Factory = Callable[[DeviceContext, DeviceProps], object]


@dataclass(frozen=True)
class DeviceType:
    name: str
    bus: BusKind
    factory: Factory
    props: tuple[Prop, ...] = ()
    description: str = ""
    user_creatable: bool = True

    def prop(self, key: str) -> Prop | None:
        return next((p for p in self.props if p.name == key), None)

    def resolve(self, raw: Mapping[str, Value], *, typed: bool = False, ident: str | None = None) -> DeviceProps:
        """Convert given values (``id`` aside) by this type's properties and fill in defaults."""
        values: dict[str, object] = {p.name: p.default for p in self.props}
        for key, value in raw.items():
            if key == "id":
                continue
            prop = self.prop(key)
            if prop is None:
                raise ConfigError(f"Property '{self.name}.{key}' not found")
            values[key] = convert(prop, value, typed=typed)
        return DeviceProps(self.name, values, ident)


#: The PCI transport's own property.
PCI_ADDR = Prop("addr", PropType.PCI_DEVFN, None, "Slot and optional function number, example: 06.0 or 06")
#: Every device's ``bus``: the PC has one PCI bus, QEMU's ``pci.0``.
PCI_BUS = Prop("bus", PropType.STR, None, "the bus to plug into: pci.0")
PCI_BUS_NAMES = ("pci.0",)


@dataclass(frozen=True)
class VirtioType:
    """A virtio device, written once.  ``make`` builds the transport-neutral device model.

    ``aliases`` maps extra driver names to a transport (``"pci"`` or ``"device"``).
    """

    name: str
    make: Factory
    props: tuple[Prop, ...] = ()
    description: str = ""
    aliases: Mapping[str, str] = field(default_factory=dict)

    def expand(self) -> list[DeviceType]:
        make = self.make

        def on_pci(ctx: DeviceContext, p: DeviceProps) -> object:
            bus = p.get_str("bus")
            if bus is not None and bus not in PCI_BUS_NAMES:
                raise ConfigError(f"Bus '{bus}' not found")
            return ctx.plug_virtio(make(ctx, p), "pci", p.get("addr"))

        def on_mmio(ctx: DeviceContext, p: DeviceProps) -> object:
            return ctx.plug_virtio(make(ctx, p), "mmio", None)

        return [DeviceType(f"{self.name}-pci", BusKind.PCI, on_pci, self.props + (PCI_ADDR, PCI_BUS),
                           f"{self.description} (virtio-pci)"),
                DeviceType(f"{self.name}-device", BusKind.VIRTIO, on_mmio, self.props,
                           f"{self.description} (virtio-mmio)")]
