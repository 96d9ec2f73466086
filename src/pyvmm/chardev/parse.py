"""Parse QEMU ``-serial``-style back-end specs into :class:`CharBackend` objects.

Accepted spellings (a subset of QEMU's)::

    stdio[,signal=on|off]          mon:stdio is taken as stdio (no monitor multiplexing)
    file:PATH[,append=on|off]
    unix:PATH[,server=on|off][,wait=on|off]   also the old ``server`` / ``nowait`` flags; ``,,`` in PATH
    pty
    null
    none                           no device at all: returns None
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyvmm.chardev.base import CharBackend
from pyvmm.chardev.file import FileBackend
from pyvmm.chardev.null import NullBackend
from pyvmm.chardev.pty import PtyBackend
from pyvmm.chardev.socket import UnixSocketBackend
from pyvmm.chardev.stdio import StdioBackend
from pyvmm.errors import ConfigError
from pyvmm.loop import MainLoop
from pyvmm.qemuopts import split_escaped
from pyvmm.runstate import VmControl

log = logging.getLogger(__name__)


def _parse_bool(spec: str, key: str, value: str) -> bool:
    v = value.lower()
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"chardev {spec!r}: {key}={value!r} must be 'on' or 'off'")


def _parse_options(spec: str, parts: list[str], allowed: dict[str, str]) -> dict[str, bool]:
    """``key=on|off`` options; ``allowed`` maps bare flags (``server``, ``nowait``) to key=value."""
    opts: dict[str, bool] = {}
    for part in parts:
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
        elif part in allowed and allowed[part]:
            key, value = allowed[part].split("=", 1)
        else:
            key, value = part, ""
        if key not in allowed:
            raise ConfigError(f"chardev {spec!r}: unknown option {key!r}"
                              f" (allowed: {', '.join(sorted(allowed)) or 'none'})")
        opts[key] = _parse_bool(spec, key, value)
    return opts


def parse_spec(spec: str) -> tuple[str, str, dict[str, bool]]:
    """Check a back-end spec without opening anything: (kind, path, options).

    ``,,`` is a literal comma in a path, as in QEMU's legacy ``unix:PATH,...`` syntax.
    Bad specs raise a one-line ConfigError.
    """
    s = spec.strip()
    if not s:
        raise ConfigError("empty chardev spec (use stdio, file:PATH, unix:PATH,server=on, pty, null or none)")
    if s.startswith("mon:"):
        s = s[4:]
    head, *parts = split_escaped(s)
    kind, colon, path = head.partition(":")
    if kind in ("none", "null", "pty", "stdio") and colon:
        raise ConfigError(f"chardev {spec!r}: {kind} takes no path")
    if kind in ("none", "null", "pty"):
        return kind, "", _parse_options(spec, parts, {})
    if kind == "stdio":
        return kind, "", _parse_options(spec, parts, {"signal": ""})
    if kind == "file":
        if not path:
            raise ConfigError(f"chardev {spec!r}: file: needs a path, e.g. file:serial.log")
        return kind, path, _parse_options(spec, parts, {"append": ""})
    if kind == "fd":  # an inherited listening socket; only the QMP monitor serves on one
        if not path.isdigit():
            raise ConfigError(f"chardev {spec!r}: fd: needs a file descriptor number")
        return kind, path, _parse_options(spec, parts, {"server": "server=on", "wait": "", "nowait": "wait=off"})
    if kind == "unix":
        if not path:
            raise ConfigError(f"chardev {spec!r}: unix: needs a path, e.g. unix:/tmp/console.sock,server=on")
        opts = _parse_options(spec, parts, {"server": "server=on", "wait": "", "nowait": "wait=off"})
        if "wait" in opts and not opts.get("server", False):
            raise ConfigError(f"chardev {spec!r}: wait= only applies with server=on")
        return kind, path, opts
    raise ConfigError(f"unknown chardev {spec!r} (use stdio, file:PATH, unix:PATH,server=on,wait=off,"
                      " pty, null or none)")


def parse_chardev(spec: str, loop: MainLoop, control: VmControl | None, label: str = "serial0", *,
                  on_quit: Callable[[], None] | None = None) -> CharBackend | None:
    """Build the back-end for ``spec``; ``none`` gives None.  Bad specs raise one-line ConfigError."""
    kind, path, opts = parse_spec(spec)
    if spec.strip().startswith("mon:"):
        log.info("%s: %r: no monitor multiplexing; using %s", label, spec, spec.strip()[4:])
    if kind == "none":
        return None
    if kind == "fd":
        raise ConfigError(f"{label}: a socket passed as fd= serves only a QMP monitor (-mon) in pyvmm")
    if kind == "null":
        return NullBackend(label)
    if kind == "pty":
        return PtyBackend(loop, label)
    if kind == "stdio":
        return StdioBackend(loop, label, on_quit=on_quit, control=control,
                            allow_signals=opts.get("signal", True))
    if kind == "file":
        return FileBackend(path, label, append=opts.get("append", False))
    return UnixSocketBackend(loop, path, label, server=opts.get("server", False), wait=opts.get("wait", True))
