"""Driver name -> device type, collected from the device modules' ``DEVICE_TYPES`` lists.

A device module declares its types next to the model (``DEVICE_TYPES = [DeviceType(...)]``
or a :class:`~pyvmm.qdev.types.VirtioType`); :meth:`Registry.discover` imports every module
of a package and registers what it finds, so adding a device touches one module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from types import ModuleType

from pyvmm.errors import ConfigError
from pyvmm.qdev.types import DeviceType, VirtioType


class Registry:
    def __init__(self, types: Iterable[DeviceType | VirtioType] = ()) -> None:
        self._types: dict[str, DeviceType] = {}
        self._aliases: dict[str, str] = {}
        for t in types:
            self.register(t)

    def register(self, t: DeviceType | VirtioType) -> None:
        if isinstance(t, VirtioType):
            for expanded in t.expand():
                self.register(expanded)
            for alias, transport in t.aliases.items():
                self.alias(alias, f"{t.name}-{transport}")
            return
        if t.name in self._types or t.name in self._aliases:
            raise ValueError(f"device type {t.name} registered twice")
        self._types[t.name] = t

    def alias(self, name: str, target: str) -> None:
        if name in self._types or name in self._aliases:
            raise ValueError(f"device type {name} registered twice")
        self._aliases[name] = target

    def get(self, name: str) -> DeviceType | None:
        return self._types.get(self._aliases.get(name, name))

    def lookup(self, name: str, *, user: bool = True) -> DeviceType:
        """The type for ``-device NAME``; one-line errors worded as QEMU's."""
        t = self.get(name)
        if t is None:
            raise ConfigError(f"'{name}' is not a valid device model name")
        if user and not t.user_creatable:
            raise ConfigError("Parameter 'driver' expects a pluggable device type")
        return t

    def names(self, *, user_creatable: bool = True) -> list[str]:
        """Every driver name, aliases included, sorted."""
        names = [n for n, t in self._types.items() if t.user_creatable or not user_creatable]
        names += [a for a, target in self._aliases.items()
                  if self._types[target].user_creatable or not user_creatable]
        return sorted(names)

    def types(self) -> list[DeviceType]:
        return [self._types[n] for n in sorted(self._types)]

    @classmethod
    def discover(cls, package: ModuleType) -> Registry:
        """Every ``DEVICE_TYPES`` in ``package`` and its sub-packages, in module-name order."""
        found: list[DeviceType | VirtioType] = list(getattr(package, "DEVICE_TYPES", ()))
        for info in sorted(pkgutil.walk_packages(package.__path__, package.__name__ + "."), key=lambda i: i.name):
            module = importlib.import_module(info.name)
            found.extend(getattr(module, "DEVICE_TYPES", ()))
        return cls(found)
