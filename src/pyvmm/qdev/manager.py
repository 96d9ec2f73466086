"""Creating devices: a registry, the machine's device tree and its :class:`DeviceContext`."""

from __future__ import annotations

from collections.abc import Mapping

from pyvmm.qdev.context import DeviceContext
from pyvmm.qdev.registry import Registry
from pyvmm.qdev.tree import Device, DeviceTree
from pyvmm.qemuopts import Value


class DeviceManager:
    def __init__(self, registry: Registry, context: DeviceContext) -> None:
        self.registry = registry
        self.context = context
        self.tree = DeviceTree()

    def create(self, driver: str, props: Mapping[str, Value] | None = None, *, ident: str | None = None,
               typed: bool = False, user: bool = True) -> Device:
        """Build one device of a registered type (``user``: from ``-device``, so it must be pluggable)."""
        t = self.registry.lookup(driver, user=user)
        self.tree.check_id(ident)
        resolved = t.resolve(props or {}, typed=typed, ident=ident)
        obj = t.factory(self.context, resolved)
        return self.tree.add(t.name, obj, ident=ident, props=resolved, type=t, user=user)

    def add_builtin(self, driver: str, obj: object) -> Device:
        """A device the board builds itself, so the tree lists every device."""
        return self.tree.add(driver, obj)

    def objects(self) -> list[object]:
        return [d.obj for d in self.tree]


__all__ = ["DeviceManager"]
