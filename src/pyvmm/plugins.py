"""User plug-ins: Python files a user's script hands to the VMM process (research and teaching).

``PYVMM_PLUGINS`` holds a ``:``-separated list of Python files (the SDK sets it from
``VM(plugins=[...])``).  Each is loaded once, in the VMM process, under the module name
``pyvmm_plugin_N``.  A plug-in may define:

* ``DEVICE_TYPES``: device types (:class:`pyvmm.qdev.DeviceType`), registered next to pyvmm's
  own, so ``-device NAME`` (``VM(devices=["NAME"])``) creates them;
* ``trace(bus, kind, address, size, value)``: called for every port-I/O (``bus == "io"``) and
  MMIO (``"mmio"``) access that reaches the VMM, after the device answered
  (:meth:`pyvmm.bus.Bus.set_tracer`).

A plug-in that fails to load is a one-line :class:`~pyvmm.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

from pyvmm.errors import ConfigError

ENV = "PYVMM_PLUGINS"


@functools.cache
def load_plugins() -> tuple[ModuleType, ...]:
    paths = [p for p in os.environ.get(ENV, "").split(":") if p]
    modules = []
    for i, path in enumerate(paths):
        spec = importlib.util.spec_from_file_location(f"pyvmm_plugin_{i}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{ENV}: {path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except FileNotFoundError:
            raise ConfigError(f"{ENV}: {path}: no such file") from None
        except Exception as e:  # the user's code: one line, not a traceback
            raise ConfigError(f"{ENV}: {path} failed to load: {type(e).__name__}: {e}") from None
        modules.append(module)
    return tuple(modules)


def plugin_device_types() -> list[object]:
    return [t for m in load_plugins() for t in getattr(m, "DEVICE_TYPES", ())]


def plugin_tracers() -> list[object]:
    return [m.trace for m in load_plugins() if callable(getattr(m, "trace", None))]
