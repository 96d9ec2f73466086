"""Opening the host side of a ``-netdev``."""

from __future__ import annotations

from pyvmm.net.base import NetBackend
from pyvmm.net.options import NetdevSpec


def open_backend(spec: NetdevSpec) -> NetBackend:
    if spec.kind == "tap":
        from pyvmm.net.tap import TapBackend

        return TapBackend.from_fd(spec.fd) if spec.fd >= 0 else TapBackend(spec.ifname)
    from pyvmm.net.user import PasstBackend

    return PasstBackend(spec.passt)
