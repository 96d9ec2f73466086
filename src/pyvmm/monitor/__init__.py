"""The QEMU Machine Protocol monitor (``--qmp``).

:class:`MonitorServer` serves QMP for one machine, which it drives only
through :class:`MachineControl` and which reports back through the server's
``on_state`` / ``on_reset`` callbacks.  See ``server.py`` for threading.
"""

from __future__ import annotations

from pyvmm.monitor.control import ChardevInfo, CpuInfo, MachineControl, MachineObserver
from pyvmm.monitor.server import MonitorServer, MonitorSpec


def create_monitor(machine: MachineControl, specs: list[str]) -> MonitorServer | None:
    """A server for the ``--qmp`` options ``specs`` (parsed now: bad specs raise ConfigError), or None."""
    if not specs:
        return None
    return MonitorServer(machine, [MonitorSpec.parse(s) for s in specs])


__all__ = ["ChardevInfo", "CpuInfo", "MachineControl", "MachineObserver", "MonitorServer", "MonitorSpec",
           "create_monitor"]
