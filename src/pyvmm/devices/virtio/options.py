"""``--drive`` specifications (QEMU's ``-drive file=...,format=...,readonly=on,if=virtio``).

``if=virtio`` (default) puts the drive on virtio-mmio; ``if=none,id=NAME`` only declares the
back-end, for a device option that names it (``--device virtio-blk-pci,drive=NAME``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvmm.errors import ConfigError
from pyvmm.qemuopts import split_opts

_BOOL = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}
FORMATS = ("raw", "qcow2")
INTERFACES = ("virtio", "none")  # none: only a back-end, for --device virtio-blk-pci,drive=ID
#: ``cache=`` is accepted for QEMU compatibility and ignored: images always use the host page
#: cache, and a guest FLUSH becomes fdatasync.
#: ``file.locking=`` is the image lock mode (on/off/auto, see pyvmm.block.lock), as QEMU's
#: file-posix option reached through -drive; QEMU refuses a bare ``locking=`` (and ``share-rw=``,
#: a device property) in -drive, and so does pyvmm.
_KEYS = ("file", "format", "readonly", "if", "serial", "id", "media", "cache", "file.locking", "snapshot")
_FORMAT_OPTIONS = ("locking", "share-rw")
LOCKING = ("on", "off", "auto")


@dataclass
class DriveSpec:
    """One ``--drive``: the image file and how to present it."""

    file: str
    format: str | None = None  # None: probe (raw or qcow2), with a warning as QEMU gives
    readonly: bool = False
    interface: str = "virtio"
    serial: str = ""
    id: str = ""
    locking: str = "auto"  # file.locking=
    snapshot: bool = False  # snapshot=on (or -snapshot): a temporary overlay takes the guest's writes
    text: str = field(default="", compare=False)  # the option's argument, for error messages


def parse_drive(text: str) -> DriveSpec:
    """Parse a ``--drive`` value (QemuOpts syntax, ``,,`` for a comma in a file name).

    Raises ConfigError with one line naming the problem.
    """
    props: dict[str, str] = {}
    for key, value, flag in split_opts(text):
        if flag and key not in _KEYS:  # QemuOpts reads "x" as x=on and "nox" as x=off
            raise ConfigError(f"--drive {text}: {key if value == 'on' else 'no' + key!r} is not key=value")
        if key in _FORMAT_OPTIONS:
            fmt_name = dict(p[:2] for p in split_opts(text)).get("format", "raw")
            raise ConfigError(f"--drive {text}: Block format '{fmt_name}' does not support the option '{key}'")
        if key not in _KEYS:
            raise ConfigError(f"--drive: unknown property {key!r} (known: {', '.join(_KEYS)})")
        if key in props:
            raise ConfigError(f"--drive: {key} given twice")
        props[key] = value
    file = props.get("file", "")
    if not file:
        raise ConfigError(f"--drive {text}: file= is required")
    fmt = props.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--drive {file}: format={fmt} is not supported (raw or qcow2)")
    ro_text = props.get("readonly", "off").lower()
    if ro_text not in _BOOL:
        raise ConfigError(f"--drive {file}: readonly={ro_text} is not on/off")
    iface = props.get("if", "virtio")
    if iface not in INTERFACES:
        raise ConfigError(f"--drive {file}: if={iface} is not supported (virtio or none)")
    if iface == "none" and not props.get("id"):
        raise ConfigError(f"--drive {file}: if=none needs id=NAME (for --device ...,drive=NAME)")
    media = props.get("media", "disk")
    if media != "disk":
        raise ConfigError(f"--drive {file}: media={media} is not supported (disk)")
    locking = props.get("file.locking", "auto")
    if locking not in LOCKING:
        raise ConfigError(f"--drive {file}: file.locking={locking}: invalid parameter value: {locking} "
                          "(on, off or auto)")
    serial = props.get("serial", "")
    if len(serial) > 20 or not serial.isascii():
        raise ConfigError(f"--drive {file}: serial must be at most 20 ASCII characters")
    snap_text = props.get("snapshot", "off").lower()
    if snap_text not in _BOOL:
        raise ConfigError(f"--drive {file}: snapshot={snap_text} is not on/off")
    return DriveSpec(file=file, format=fmt, readonly=_BOOL[ro_text], interface=iface, serial=serial,
                     id=props.get("id", ""), locking=locking, snapshot=_BOOL[snap_text], text=text)
