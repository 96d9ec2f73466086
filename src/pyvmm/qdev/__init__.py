"""The device manager, in the role of QEMU's qdev and Firecracker's ``device_manager``.

* :mod:`.props`    - typed properties and how ``-device`` values become them;
* :mod:`.types`    - a device type: its QEMU driver name, bus, properties and factory; a virtio
  device is declared once and gets one type per transport (``-pci``, ``-device``);
* :mod:`.context`  - what a factory may ask of the machine (buses, interrupt lines, back-ends);
* :mod:`.registry` - driver name -> type, found in the device modules' ``DEVICE_TYPES``;
* :mod:`.tree`     - the devices of one machine, by id and by QOM-style path;
* :mod:`.manager`  - creating devices into a tree through a context.

This package knows no device model: device modules declare their types here, and the
machine builder implements :class:`~pyvmm.qdev.context.DeviceContext`.
"""

from pyvmm.qdev.context import DeviceContext
from pyvmm.qdev.manager import DeviceManager
from pyvmm.qdev.props import Prop, PropType
from pyvmm.qdev.registry import Registry
from pyvmm.qdev.tree import Device, DeviceTree
from pyvmm.qdev.types import BusKind, DeviceProps, DeviceType, VirtioType

__all__ = ["BusKind", "Device", "DeviceContext", "DeviceManager", "DeviceProps", "DeviceTree", "DeviceType",
           "Prop", "PropType", "Registry", "VirtioType"]
