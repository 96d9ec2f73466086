"""The guest kit: everything needed to boot a real Linux shell with no arguments.

``default_guest()`` returns a stock Debian cloud kernel and a busybox initramfs
(built once, cached under ``$XDG_CACHE_HOME/pyvmm``) plus a kernel command
line.  ``python -m pyvmm.guestkit`` prepares them and prints the paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pyvmm.guestkit.agent import find_agent
from pyvmm.guestkit.busybox import find_busybox
from pyvmm.guestkit.cache import atomic_write_bytes, cache_lock, cache_subdir, remove_stale_temporaries
from pyvmm.guestkit.errors import GuestKitError
from pyvmm.guestkit.initramfs import (
    DEFAULT_HOSTNAME,
    DEFAULT_MODULES,
    FORMAT_VERSION,
    HVC_READY_MARKER,
    READY_MARKER,
    build_initramfs,
)
from pyvmm.guestkit.kernel import KernelInfo, obtain_kernel
from pyvmm.guestkit.vmlinux import pvh_entry, vmlinux_for

__all__ = [
    "DEFAULT_CMDLINE",
    "DEFAULT_MODULES",
    "HVC_READY_MARKER",
    "READY_MARKER",
    "GuestImages",
    "GuestKitError",
    "KernelInfo",
    "build_initramfs",
    "default_guest",
    "obtain_kernel",
    "pvh_entry",
    "split_cmdline",
    "vmlinux_for",
]

log = logging.getLogger(__name__)

# Parameters that may legitimately appear several times (console=tty0 console=ttyS0).
_REPEATABLE = frozenset({"console="})

# Serial console (the VMM's 16550 on 0x3f8) and reboot at once on panic, so a
# dying guest ends the VM instead of hanging.
DEFAULT_CMDLINE: tuple[str, ...] = ("console=ttyS0", "panic=-1")


_TOKEN = re.compile(r'(?:[^\s"]+|"[^"]*")+')


def split_cmdline(text: str) -> list[str]:
    """Split a kernel command line into parameters, keeping ``key="a b"`` together as the kernel does."""
    return _TOKEN.findall(text)


@dataclass(frozen=True)
class GuestImages:
    """Paths of a bootable kernel + initrd and the command line to boot them with."""

    kernel: Path
    initrd: Path
    cmdline: str
    kernel_info: KernelInfo | None = None
    modules: tuple[str, ...] = ()

    def with_cmdline(self, *extra: str) -> GuestImages:
        """A copy with ``extra`` parameters appended (e.g. ``"tsc_early_khz=2000000"``).

        A parameter whose ``key=`` is already present replaces the old value
        (except ``console=``, which the kernel accepts several times).
        """
        params = split_cmdline(self.cmdline)
        for arg in extra:
            for item in split_cmdline(arg):
                key = item.split("=", 1)[0] + "=" if "=" in item else None
                if key is not None and key not in _REPEATABLE:
                    params = [p for p in params if not p.startswith(key)]
                if item in params:
                    continue
                params.append(item)
        return replace(self, cmdline=" ".join(params))


def _initrd_key(kernel: KernelInfo, modules: Sequence[str], busybox_sha: str, hostname: str, compress: bool) -> str:
    # The builder's own source is part of the key too: an edit of /init rebuilds cached images.
    builder = hashlib.sha256(Path(build_initramfs.__code__.co_filename).read_bytes()).hexdigest()[:16]
    material = json.dumps([FORMAT_VERSION, kernel.cache_key, list(modules), busybox_sha, hostname, compress,
                           builder]).encode()
    return hashlib.sha256(material).hexdigest()[:16]


def default_guest(
    *,
    extra_cmdline: Sequence[str] = (),
    modules: Sequence[str] = DEFAULT_MODULES,
    refresh: bool = False,
    compress: bool = False,
    hostname: str = DEFAULT_HOSTNAME,
    with_agent: bool = True,
) -> GuestImages:
    """Ensure the default kernel and initramfs are cached (building once) and return them.

    ``refresh`` asks apt for a newer kernel first; otherwise the cached one is
    reused without touching apt or the network.  ``with_agent`` puts Debian's qemu-ga (when the
    host has it) into the initramfs; it runs only when the VM has an ``org.qemu.guest_agent.0`` port.
    """
    kernel = obtain_kernel(refresh=refresh)
    busybox = find_busybox()
    agent = find_agent() if with_agent else None
    key = _initrd_key(kernel, modules, busybox.sha256 + (agent.cache_key if agent else ""), hostname, compress)
    directory = cache_subdir("initramfs")
    initrd = directory / f"initramfs-{kernel.release}-{key}.cpio{'.gz' if compress else ''}"
    loaded: tuple[str, ...] = ()
    with cache_lock("initramfs"):
        remove_stale_temporaries(directory)
        manifest = initrd.with_name(initrd.name + ".json")
        if initrd.is_file() and manifest.is_file():
            try:
                loaded = tuple(json.loads(manifest.read_text())["modules"])
            except (OSError, ValueError, KeyError, TypeError):
                loaded = ()
        else:
            log.info("building initramfs for %s", kernel.release)
            info = build_initramfs(kernel, list(modules), initrd, busybox=busybox, hostname=hostname, compress=compress,
                                   agent=agent)
            loaded = info.modules
            atomic_write_bytes(
                manifest,
                json.dumps(
                    {"modules": list(info.modules), "builtin": list(info.builtin), "missing": list(info.missing)}
                ).encode(),
            )
    images = GuestImages(
        kernel=kernel.vmlinuz,
        initrd=initrd,
        cmdline=" ".join(DEFAULT_CMDLINE),
        kernel_info=kernel,
        modules=loaded,
    )
    return images.with_cmdline(*extra_cmdline) if extra_cmdline else images
