"""pyvmm: a hackable virtual machine monitor in Python.

The public API (docs/python-api.md)::

    from pyvmm import VM
    with VM(memory="512M", cpus=2) as vm:
        print(vm.exec(["uname", "-r"]).stdout)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pyvmm.sdk import VM, Disk, ExecResult, QMPError, Share, VMError, VMTimeout

_PUBLIC = ("VM", "Disk", "ExecResult", "QMPError", "Share", "VMError", "VMTimeout")
__all__ = ["VM", "Disk", "ExecResult", "QMPError", "Share", "VMError", "VMTimeout", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `pyvmm run` does not load the SDK.
    if name in _PUBLIC:
        from pyvmm import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
