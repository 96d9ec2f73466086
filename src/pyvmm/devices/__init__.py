"""Device models.  Each module that defines a device users can name also declares its
``DEVICE_TYPES`` (:mod:`pyvmm.qdev`); :func:`device_registry` collects them all."""

from __future__ import annotations

import functools

from pyvmm.qdev import Registry


@functools.cache
def device_registry() -> Registry:
    """Every device type in :mod:`pyvmm.devices`, found once per process."""
    import pyvmm.devices
    from pyvmm.plugins import plugin_device_types

    registry = Registry.discover(pyvmm.devices)
    for t in plugin_device_types():  # a user's own devices (PYVMM_PLUGINS)
        registry.register(t)  # type: ignore[arg-type]
    return registry
