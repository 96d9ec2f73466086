"""Default locations shared by the daemon and the CLI (kept import-light: the CLI loads it on every call)."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """/var/lib/pyvmm for root; $XDG_RUNTIME_DIR/pyvmm (or ~/.local/state/pyvmm) for other users."""
    if os.geteuid() == 0:
        return Path("/var/lib/pyvmm")
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.expanduser("~/.local/state")
    return Path(base) / "pyvmm"


def default_socket() -> Path:
    """Where the CLI looks for the daemon: $PYVMMD_SOCKET, else the default state directory's socket."""
    env = os.environ.get("PYVMMD_SOCKET")
    return Path(env) if env else default_state_dir() / "pyvmmd.sock"
