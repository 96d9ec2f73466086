"""Device models.  Each module that defines a device users can name also declares its
``DEVICE_TYPES`` (:mod:`pyvmm.qdev`); :func:`device_registry` collects them all."""

from __future__ import annotations

import functools

from pyvmm.qdev import Registry


@functools.cache
def device_registry() -> Registry:
    """Every device type in :mod:`pyvmm.devices`, found once per process."""
    import pyvmm.devices

    return Registry.discover(pyvmm.devices)
