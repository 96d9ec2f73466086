"""The host side of the QEMU guest agent protocol (QGA), spoken over a virtio-serial port's socket.

:class:`QgaClient` drives Debian's ``qemu-ga`` (or anything answering as it does): the
``guest-sync-delimited`` handshake, commands, ``guest-exec``, the file commands with base64
data.  It knows nothing of pyvmm's machine: any VMM serving the port on a unix socket will do.
"""

from pyvmm.qga.client import ExecResult, ExecStatus, QgaClient
from pyvmm.qga.errors import QgaCommandError, QgaError, QgaTimeout

__all__ = ["ExecResult", "ExecStatus", "QgaClient", "QgaCommandError", "QgaError", "QgaTimeout"]
