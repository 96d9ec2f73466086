"""Find a statically linked x86-64 busybox for the initramfs.

The initramfs has no libc, so busybox must be static: Debian's
``busybox-static`` package provides ``/bin/busybox``.  A dynamically linked
busybox (Debian's plain ``busybox`` package) is rejected.  If the host has no
usable one, ``busybox-static`` is fetched with apt and cached under
``<cache>/busybox/<version>/``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyvmm.guestkit import apt
from pyvmm.guestkit.cache import atomic_output_dir, cache_lock, cache_subdir, remove_stale_temporaries
from pyvmm.guestkit.deb import extract_deb
from pyvmm.guestkit.errors import GuestKitError

log = logging.getLogger(__name__)

HOST_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"), Path("/sbin/busybox"))
PACKAGE = "busybox-static"


@dataclass(frozen=True)
class Busybox:
    """A usable busybox binary and the applet paths it provides (``bin/sh``, ``sbin/insmod``...)."""

    path: Path
    sha256: str
    applets: tuple[str, ...]


def is_static_x86_64(path: Path) -> bool:
    """True for an x86-64 ELF executable without an ELF interpreter (i.e. static)."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            if elf["e_machine"] != "EM_X86_64":
                return False
            return not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
    except (OSError, ELFError):
        return False


def list_applets(path: Path) -> tuple[str, ...]:
    """Applet install paths, from ``busybox --list-full`` (falls back to ``--list``)."""
    for flag, prefix in (("--list-full", ""), ("--list", "bin/")):
        try:
            proc = subprocess.run([str(path), flag], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0 and proc.stdout.strip():
            names = [prefix + ln.strip().lstrip("/") for ln in proc.stdout.splitlines() if ln.strip()]
            return tuple(n for n in names if ".." not in n.split("/"))
    raise GuestKitError(f"cannot list the applets of {path} (is it runnable on this host?)")


def _describe(path: Path) -> Busybox:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Busybox(path=path, sha256=digest, applets=list_applets(path))


def _fetch_from_apt() -> Path:
    version = apt.ensure_candidate(PACKAGE)
    base = cache_subdir("busybox")
    entry = base / version.replace(":", "_")
    binary = entry / "busybox"
    with cache_lock("busybox"):
        remove_stale_temporaries(base)
        if binary.is_file():
            return binary
        with tempfile.TemporaryDirectory(prefix=".download.", suffix=".tmp", dir=base) as dl:
            deb = apt.download(PACKAGE, version, Path(dl))
            with atomic_output_dir(entry) as tmp:
                got = extract_deb(deb, tmp / "raw", lambda p: p in ("bin/busybox", "usr/bin/busybox"))
                if not got:
                    raise GuestKitError(f"{deb.name} contains no busybox binary")
                (tmp / "raw" / got[0]).rename(tmp / "busybox")
                shutil.rmtree(tmp / "raw")
    return binary


def find_busybox() -> Busybox:
    """A static busybox: the host's if usable, else ``busybox-static`` via apt (cached)."""
    for candidate in HOST_CANDIDATES:
        if candidate.is_file() and is_static_x86_64(candidate):
            log.debug("using host busybox %s", candidate)
            return _describe(candidate)
    cached = sorted(cache_subdir("busybox").glob("*/busybox"))
    for candidate in reversed(cached):
        if is_static_x86_64(candidate):
            return _describe(candidate)
    if not apt.apt_available():
        raise GuestKitError("no static busybox found: install busybox-static (apt is not available)")
    path = _fetch_from_apt()
    if not is_static_x86_64(path):
        raise GuestKitError(f"{path} from {PACKAGE} is not a static x86-64 binary")
    return _describe(path)
