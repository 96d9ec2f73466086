"""Typed device properties: what ``-device DRIVER,key=value`` values become.

Each property has one of QEMU's property types (the names ``device-list-properties``
reports).  QemuOpts syntax gives strings, read as QEMU's keyval visitor reads them; JSON
syntax gives typed values, which must already have the right JSON type.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from pyvmm.errors import ConfigError
from pyvmm.qemuopts import Value, parse_bool, parse_int


class PropType(enum.Enum):
    STR = "str"
    BOOL = "bool"
    UINT8 = "uint8"
    UINT16 = "uint16"
    UINT32 = "uint32"
    UINT64 = "uint64"
    PCI_DEVFN = "pci-devfn"  # QEMU's "addr": slot[.function]
    MACADDR = "macaddr"  # 52:54:00:12:34:56
    INT32 = "int32"  # e.g. bootindex (-1: none)

    @property
    def qemu_type(self) -> str:
        """The type name QEMU's ``device-list-properties`` reports."""
        return {"pci-devfn": "int32", "macaddr": "str"}.get(self.value, self.value)

    @property
    def bits(self) -> int:
        return {"uint8": 8, "uint16": 16, "uint32": 32, "uint64": 64}.get(self.value, 0)


@dataclass(frozen=True)
class Prop:
    """One property of a device type.  ``default`` None means "not set" (the factory decides)."""

    name: str
    type: PropType
    default: object = None
    description: str = ""


def convert(prop: Prop, value: Value, *, typed: bool) -> object:
    """``value`` as ``prop``'s type, or a ConfigError worded as QEMU words it (no option prefix)."""
    key = prop.name
    kind = prop.type
    if kind in (PropType.STR, PropType.MACADDR):
        if not isinstance(value, str):
            raise ConfigError(f"Invalid parameter type for '{key}', expected: string")
        if kind is PropType.MACADDR:
            return parse_macaddr(key, value)
        return value
    if kind is PropType.BOOL:
        if typed and not isinstance(value, bool):
            raise ConfigError(f"Invalid parameter type for '{key}', expected: boolean")
        if isinstance(value, str) and value not in ("on", "off", "yes", "no", "true", "false", "y", "n"):
            raise ConfigError(f"Parameter '{key}' does not accept value '{value}'")
        return parse_bool(value, key)
    if kind is PropType.PCI_DEVFN:
        return parse_devfn(key, value)
    if typed and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"Invalid parameter type for '{key}', expected: integer")
    number = parse_int(value, key)
    if kind is PropType.INT32:
        if not -(1 << 31) <= number < 1 << 31:
            raise ConfigError(f"Parameter '{key}' expects int32_t")
        return number
    if not 0 <= number < 1 << kind.bits:
        raise ConfigError(f"Parameter '{key}' expects uint{kind.bits}_t" if kind.bits < 64
                          else f"Parameter '{key}' expects uint64")
    return number


_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}\Z")


def parse_macaddr(key: str, text: str) -> bytes:
    if not _MAC_RE.match(text):
        raise ConfigError(f"Property '{key}' doesn't take value '{text}'")
    return bytes(int(part, 16) for part in re.split(r"[:-]", text))


def parse_devfn(key: str, value: Value) -> int:
    """QEMU's PCI ``addr``: ``SLOT[.FN]`` in hex from a string, a devfn (slot * 8 + fn) from JSON."""
    bad = ConfigError(f"Property '{key}' doesn't take value '{value}'")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        if not 0 <= value < 256:
            raise bad
        return value
    if not isinstance(value, str):
        raise bad
    m = re.fullmatch(r"(?:0[xX])?([0-9A-Fa-f]{1,2})(?:\.([0-7]))?", value)
    if not m:
        raise bad
    slot = int(m.group(1), 16)
    if slot > 31:
        raise bad
    return slot << 3 | int(m.group(2) or "0")
