"""``--netdev`` and ``--device virtio-net-pci`` option parsing (QEMU spellings).

    --netdev user,id=n0[,passt=PATH]
    --netdev tap,id=n0[,ifname=tap0][,script=no][,downscript=no]
    --device virtio-net-pci,netdev=n0[,mac=52:54:00:12:34:56][,mrg_rxbuf=on|off][,addr=SLOT][,id=NAME]

Every malformed value raises :class:`~pyvmm.errors.ConfigError` with one line
naming the problem.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pyvmm.errors import ConfigError
from pyvmm.qemuopts import parse_json, split_opts

NETDEV_KINDS = ("user", "tap")
_BOOL = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
_KEYS = {"user": ("id", "passt"), "tap": ("id", "ifname", "script", "downscript", "vnet_hdr")}
_NIC_KEYS = ("netdev", "mac", "mrg_rxbuf", "addr", "id")


@dataclass
class NetdevSpec:
    """A host network back-end: ``kind`` is ``user`` (passt helper) or ``tap``."""

    kind: str
    id: str
    ifname: str = ""
    passt: str = ""


@dataclass
class NicSpec:
    """A virtio-net-pci device: which netdev it uses and its MAC address."""

    netdev: str
    mac: bytes
    mrg_rxbuf: bool = False
    slot: int | None = None
    id: str = ""


def parse_netdev(text: str) -> NetdevSpec:
    """Parse a ``--netdev`` value: QemuOpts (``user,id=n0``) or JSON (``{"type":"user","id":"n0"}``)."""
    if text.startswith("{"):
        items = list(parse_json("netdev", text).items())
    else:
        items = []
        for key, value, flag in split_opts(text, "type"):
            if flag:
                raise ConfigError(f"--netdev {text}: {key if value == 'on' else 'no' + key!r} is not key=value")
            items.append((key, value))
    kind = next((v for k, v in items if k == "type"), "")
    if not kind:
        raise ConfigError("--netdev needs a type (user or tap)")
    if not isinstance(kind, str) or kind not in NETDEV_KINDS:
        raise ConfigError(f"--netdev {kind}: unsupported type (supported: {', '.join(NETDEV_KINDS)})")
    props: dict[str, str] = {}
    for key, value in items:
        if key == "type":
            continue
        if key not in _KEYS[kind]:
            raise ConfigError(f"--netdev {kind}: unknown property {key!r} (known: {', '.join(_KEYS[kind])})")
        if key in props:
            raise ConfigError(f"--netdev {kind}: {key} given twice")
        if isinstance(value, bool):
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"--netdev {kind}: Invalid parameter type for '{key}', expected: string")
        props[key] = value
    ident = props.get("id", "")
    if not _ID_RE.match(ident):
        raise ConfigError(f"--netdev {kind}: id= is required (a letter, then letters, digits, _ . -)")
    spec = NetdevSpec(kind, ident)
    if kind == "tap":
        spec.ifname = props.get("ifname", "")
        if spec.ifname and not _IFNAME_RE.match(spec.ifname):
            raise ConfigError(f"--netdev tap: ifname={spec.ifname!r} is not a valid interface name")
        for key in ("script", "downscript"):
            if props.get(key, "no") != "no":
                raise ConfigError(f"--netdev tap: {key}= is not supported (only {key}=no)")
        if props.get("vnet_hdr", "on") not in ("on", "true", "yes"):
            raise ConfigError("--netdev tap: vnet_hdr=off is not supported")
    else:
        spec.passt = props.get("passt", "")
    return spec


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes; multicast addresses are refused."""
    if not _MAC_RE.match(text.strip()):
        raise ConfigError(f"mac={text!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    mac = bytes(int(x, 16) for x in re.split("[:-]", text.strip()))
    if mac[0] & 1:
        raise ConfigError(f"mac={text}: a multicast address cannot be a NIC address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A random locally administered unicast address in QEMU's 52:54:00 prefix."""
    return bytes((0x52, 0x54, 0x00)) + os.urandom(3)


def parse_nic(driver: str, props: dict[str, str]) -> NicSpec:
    """The properties of ``--device virtio-net-pci,...``."""
    what = f"--device {driver}"
    unknown = sorted(set(props) - set(_NIC_KEYS))
    if unknown:
        raise ConfigError(f"{what}: unknown property {unknown[0]!r} (known: {', '.join(_NIC_KEYS)})")
    netdev = props.get("netdev", "")
    if not netdev:
        raise ConfigError(f"{what}: netdev= is required")
    mac = parse_mac(props["mac"]) if "mac" in props else random_mac()
    mrg = props.get("mrg_rxbuf", "off").lower()
    if mrg not in _BOOL:
        raise ConfigError(f"{what}: mrg_rxbuf={mrg} is not on/off")
    return NicSpec(netdev, mac, _BOOL[mrg], parse_slot(what, props.get("addr")), props.get("id", ""))


def parse_slot(what: str, text: str | None) -> int | None:
    """QEMU's ``addr=`` (``5``, ``0x5``, ``05.0``) -> slot number, function 0 only."""
    if text is None:
        return None
    slot_text, _, fn = text.partition(".")
    try:
        slot = int(slot_text, 16) if "." in text else int(slot_text, 0)
    except ValueError:
        raise ConfigError(f"{what}: addr={text!r} is not a slot number") from None
    if fn not in ("", "0") or not 1 <= slot < 32:
        raise ConfigError(f"{what}: addr={text} must be a slot 1-31 (function 0)")
    return slot
