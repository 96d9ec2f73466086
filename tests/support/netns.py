"""Throw-away network namespaces for the network tests (needs root and iproute2).

Nothing here touches the host's own namespace: every interface is created
inside a namespace made for one test and deleted with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

#: Addresses inside the user-mode test namespace: passt copies them to the guest.
USER_HOST_ADDR = "10.0.2.15"
USER_GATEWAY = "10.0.2.2"
#: tap test: host side of the tap and the guest's static address.
TAP_HOST_ADDR = "10.0.3.1"
TAP_GUEST_ADDR = "10.0.3.2"


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.fail("network tests need root (ip netns, /dev/net/tun)", pytrace=False)
    if not shutil.which("ip"):
        pytest.fail("iproute2 'ip' is missing", pytrace=False)
    if not os.path.exists("/dev/net/tun"):
        pytest.fail("/dev/net/tun is missing", pytrace=False)


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    """A fresh namespace with loopback up; deleted afterwards."""
    require_netns()
    name = f"{name}-{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def setup_user_ns(ns: str) -> None:
    """A veth pair with an address and a default route, so passt has an uplink to copy.

    The "gateway" does not exist; passt maps connections to it onto the namespace's
    loopback, and there is no other way out of the namespace.
    """
    _ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    _ip("-n", ns, "addr", "add", f"{USER_HOST_ADDR}/24", "dev", "v0")
    _ip("-n", ns, "link", "set", "v0", "up")
    _ip("-n", ns, "link", "set", "v1", "up")
    _ip("-n", ns, "route", "add", "default", "via", USER_GATEWAY, "dev", "v0")


def setup_tap_ns(ns: str, ifname: str = "tap0") -> None:
    """A persistent tap interface with the host address, up (pyvmm attaches to it)."""
    _ip("-n", ns, "tuntap", "add", "dev", ifname, "mode", "tap", "vnet_hdr")
    _ip("-n", ns, "addr", "add", f"{TAP_HOST_ADDR}/24", "dev", ifname)
    _ip("-n", ns, "link", "set", ifname, "up")


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]
