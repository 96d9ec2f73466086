"""Debian's QEMU guest agent (``qemu-ga``) for the default guest, with its shared libraries.

The initramfs has no package manager and no libc of its own, so the agent goes in as the
host's ``/usr/sbin/qemu-ga`` (Debian's ``qemu-guest-agent`` package, which
``scripts/bootstrap`` installs) plus every library ``ldd`` names, at the paths the dynamic
loader looks for them.  The guest's /init starts it once the port
``org.qemu.guest_agent.0`` of a virtio-serial device appears (see
:data:`pyvmm.guestkit.initramfs.AGENT_PORT`); without such a port it never runs.

``qemu-ga``'s ``guest-shutdown`` runs ``/sbin/shutdown -h -P +0 MSG`` and expects status 0;
busybox has no ``shutdown``, so :data:`SHUTDOWN_SCRIPT` stands in for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pyvmm.guestkit.errors import GuestKitError

log = logging.getLogger(__name__)

AGENT_CANDIDATES = (Path("/usr/sbin/qemu-ga"), Path("/usr/bin/qemu-ga"))
#: Where /init finds the agent in the guest.
GUEST_AGENT_PATH = "usr/sbin/qemu-ga"

SHUTDOWN_SCRIPT = """\
#!/bin/sh
# qemu-ga's guest-shutdown runs "shutdown -h -P|-H|-r +0 MESSAGE" and waits for status 0.
case " $* " in
    *" -r "*) action=reboot ;;
    *" -H "*) action=halt ;;
    *) action=poweroff ;;
esac
(sleep 0.2; sync; "$action" -f) </dev/null >/dev/null 2>&1 &
exit 0
"""

_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


@dataclass(frozen=True)
class GuestAgent:
    """The agent binary and the files it needs: guest path (relative) -> host file."""

    binary: Path
    files: tuple[tuple[str, Path], ...]

    @property
    def cache_key(self) -> str:
        h = hashlib.sha256()
        for guest_path, host in self.files:
            st = host.stat()
            h.update(f"{guest_path}:{host}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def total_size(self) -> int:
        return sum(host.stat().st_size for _, host in self.files)


def find_agent_binary() -> Path | None:
    found = shutil.which("qemu-ga")
    candidates = ([Path(found)] if found else []) + list(AGENT_CANDIDATES)
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries (and the dynamic loader) ``ldd`` lists for ``binary``, in its order."""
    try:
        r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestKitError(f"ldd {binary}: {e}") from None
    if r.returncode != 0:
        raise GuestKitError(f"ldd {binary}: {(r.stderr or r.stdout).strip()[:200]}")
    libs = []
    for line in r.stdout.splitlines():
        if "not found" in line:
            raise GuestKitError(f"{binary} needs a library the host lacks: {line.strip()}")
        m = _LDD_LINE.match(line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def find_agent() -> GuestAgent | None:
    """The host's qemu-ga with its libraries, or None when it is not installed."""
    binary = find_agent_binary()
    if binary is None:
        log.info("qemu-ga not found (Debian's qemu-guest-agent package): the default guest runs no agent")
        return None
    files = [(GUEST_AGENT_PATH, binary.resolve())]
    for lib in shared_libraries(binary):
        files.append((str(lib).lstrip("/"), lib.resolve()))
    return GuestAgent(binary, tuple(files))


__all__ = ["GUEST_AGENT_PATH", "SHUTDOWN_SCRIPT", "GuestAgent", "find_agent", "shared_libraries"]
