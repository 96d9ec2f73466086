"""The devices of one machine, by id and by path, as QEMU's QOM composition tree names them.

``-device ...,id=ID`` is ``/machine/peripheral/ID``; an anonymous one is
``/machine/peripheral-anon/device[N]``; what the board builds itself is
``/machine/unattached/device[N]``.  Ids are unique among devices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pyvmm.errors import ConfigError
from pyvmm.qdev.types import DeviceProps, DeviceType


@dataclass
class Device:
    driver: str
    path: str
    obj: object
    id: str | None = None
    props: DeviceProps | None = None
    type: DeviceType | None = None
    user: bool = False  # created by -device (not built into the board)


class DeviceTree:
    def __init__(self) -> None:
        self._devices: list[Device] = []
        self._by_path: dict[str, Device] = {}
        self._anon = {"peripheral-anon": 0, "unattached": 0}

    def check_id(self, ident: str | None) -> None:
        if ident is not None and f"/machine/peripheral/{ident}" in self._by_path:
            raise ConfigError(f"Duplicate ID '{ident}' for device")

    def add(self, driver: str, obj: object, *, ident: str | None = None, props: DeviceProps | None = None,
            type: DeviceType | None = None, user: bool = False) -> Device:
        self.check_id(ident)
        if ident is not None:
            path = f"/machine/peripheral/{ident}"
        else:
            container = "peripheral-anon" if user else "unattached"
            path = f"/machine/{container}/device[{self._anon[container]}]"
            self._anon[container] += 1
        dev = Device(driver, path, obj, ident, props, type, user)
        self._devices.append(dev)
        self._by_path[path] = dev
        return dev

    def next_path(self, ident: str | None, user: bool) -> str:
        """The path :meth:`add` will give the next device with this id (or none)."""
        if ident is not None:
            return f"/machine/peripheral/{ident}"
        container = "peripheral-anon" if user else "unattached"
        return f"/machine/{container}/device[{self._anon[container]}]"

    def find(self, name: str) -> Device | None:
        """A device by path, or by id (QEMU's ``qom-get`` takes either for peripherals)."""
        return self._by_path.get(name) or self._by_path.get(f"/machine/peripheral/{name}")

    def count(self, driver: str) -> int:
        return sum(1 for d in self._devices if d.driver == driver)

    def __iter__(self) -> Iterator[Device]:
        return iter(list(self._devices))

    def __len__(self) -> int:
        return len(self._devices)
