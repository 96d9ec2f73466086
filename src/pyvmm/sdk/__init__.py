"""pyvmm's public Python API (``from pyvmm import VM``); see docs/python-api.md."""

from pyvmm.qga import ExecResult
from pyvmm.sdk.console import Console
from pyvmm.sdk.errors import QMPError, VMError, VMTimeout
from pyvmm.sdk.vm import VM, Disk, Share

__all__ = ["VM", "Console", "Disk", "ExecResult", "QMPError", "Share", "VMError", "VMTimeout"]
