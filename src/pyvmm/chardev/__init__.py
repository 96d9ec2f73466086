"""Character back-ends (stdio, file, unix socket, pty, null) for serial-like front-ends."""

from pyvmm.chardev.base import CharBackend, CharBackendBase, CharReceiver
from pyvmm.chardev.file import FileBackend
from pyvmm.chardev.null import NullBackend
from pyvmm.chardev.parse import parse_chardev
from pyvmm.chardev.pty import PtyBackend
from pyvmm.chardev.socket import UnixSocketBackend
from pyvmm.chardev.stdio import StdioBackend

__all__ = [
    "CharBackend", "CharBackendBase", "CharReceiver", "FileBackend", "NullBackend", "PtyBackend",
    "StdioBackend", "UnixSocketBackend", "parse_chardev",
]
