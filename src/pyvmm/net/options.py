"""``--netdev`` and ``--device virtio-net-pci`` option parsing (QEMU spellings).

    --netdev user,id=n0[,passt=PATH]
    --netdev tap,id=n0[,ifname=tap0][,script=no][,downscript=no]
    --netdev tap,id=n0,fd=N[,vhost=off]      a tap the parent opened (libvirt)
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
_KEYS = {"user": ("id", "passt"), "tap": ("id", "ifname", "script", "downscript", "vnet_hdr", "fd", "vhost")}


@dataclass
class NetdevSpec:
    """A host network back-end: ``kind`` is ``user`` (passt helper) or ``tap``."""

    kind: str
    id: str
    ifname: str = ""
    passt: str = ""
    fd: int = -1  # tap: fd=N, a tap device the parent opened (libvirt)


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
        if props.get("vhost", "off") not in ("off", "false", "no"):
            raise ConfigError("--netdev tap: pyvmm cannot honour vhost=on (no vhost-net: the device is in userspace)")
        if "fd" in props:
            if not props["fd"].isdigit() or spec.ifname:
                raise ConfigError("--netdev tap: fd= takes a file descriptor number, and no ifname=")
            spec.fd = int(props["fd"])
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
