"""Start Debian's virtiofsd for a host directory, and the options that give it to a guest.

Debian 12 ships virtiofsd in ``qemu-system-common`` (QEMU 7.2's C daemon,
``/usr/lib/qemu/virtiofsd``); later releases ship the Rust daemon in the ``virtiofsd``
package (``/usr/libexec/virtiofsd``).  Both are found; their command lines differ.

Sandboxing: as root (as here) the daemon's default ``namespace`` sandbox works: it enters new
mount, PID and network namespaces and pivots into the shared directory, so a guest can reach
nothing outside it.  Without the privileges for namespaces, ``chroot`` is the fallback a
container allows (``sandbox="chroot"``).

For ``pyvmm exec --share HOST_DIR:TAG`` and the SDK::

    share = parse_share("/src:src")
    with start_virtiofsd(share.host_dir, "/run/pyvmm/vfs0.sock") as daemon:
        argv += share_options([(daemon, share.tag)], memory=512 << 20)
        # in the guest: mount -t virtiofs src /mnt/src
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import ConfigError, PyvmmError

log = logging.getLogger(__name__)

#: Where Debian installs it: the Rust daemon (package virtiofsd, Debian 13+), then QEMU 7.2's C
#: daemon (package qemu-system-common, Debian 12).
CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
START_TIMEOUT = 10.0
TAG_MAX = 36


@dataclass(frozen=True)
class Share:
    """``--share HOST_DIR:TAG``: a host directory and the tag the guest mounts it by."""

    host_dir: str
    tag: str

    @property
    def guest_mount_command(self) -> list[str]:
        return ["mount", "-t", "virtiofs", self.tag, f"/mnt/{self.tag}"]


def parse_share(text: str) -> Share:
    """``HOST_DIR:TAG`` (TAG defaults to the directory's name); the directory must exist."""
    host_dir, sep, tag = text.rpartition(":")
    if not sep:
        host_dir, tag = text, os.path.basename(os.path.normpath(text))
    if not host_dir or not tag:
        raise ConfigError(f"--share {text}: expected HOST_DIR:TAG")
    if len(tag.encode()) > TAG_MAX or "/" in tag or "," in tag:
        raise ConfigError(f"--share {text}: the tag must be at most {TAG_MAX} bytes, without '/' or ','")
    if not os.path.isdir(host_dir):
        raise ConfigError(f"--share {text}: {host_dir} is not a directory")
    return Share(os.path.abspath(host_dir), tag)


def find_virtiofsd() -> str:
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("virtiofsd")
    if found:
        return found
    raise PyvmmError("virtiofsd is not installed (Debian 12: apt-get install qemu-system-common; "
                     "later: apt-get install virtiofsd)")


def _is_rust(binary: str) -> bool:
    return not binary.startswith("/usr/lib/qemu/")


def virtiofsd_command(binary: str, shared_dir: str, socket_path: str, *, sandbox: str = "namespace",
                      cache: str = "auto", extra: Sequence[str] = ()) -> list[str]:
    if _is_rust(binary):
        return [binary, f"--socket-path={socket_path}", f"--shared-dir={shared_dir}", f"--sandbox={sandbox}",
                f"--cache={cache}", *extra]
    return [binary, f"--socket-path={socket_path}", "-o", f"source={shared_dir}", "-o", f"sandbox={sandbox}",
            "-o", f"cache={cache}", *extra]


class Virtiofsd:
    """A running virtiofsd; :meth:`stop` (or leaving the ``with``) ends it and removes its socket."""

    def __init__(self, process: subprocess.Popen[bytes], socket_path: str, shared_dir: str, log_path: str) -> None:
        self.process = process
        self.socket_path = socket_path
        self.shared_dir = shared_dir
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.log_path).read_text(errors="replace")
        return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def __enter__(self) -> Virtiofsd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_virtiofsd(shared_dir: str, socket_path: str, *, sandbox: str = "namespace", cache: str = "auto",
                    binary: str | None = None, extra: Sequence[str] = (),
                    timeout: float = START_TIMEOUT) -> Virtiofsd:
    """Run virtiofsd serving ``shared_dir`` on ``socket_path``; returns once it listens."""
    if not os.path.isdir(shared_dir):
        raise PyvmmError(f"virtiofsd: {shared_dir} is not a directory")
    binary = binary or find_virtiofsd()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # a stale socket from an earlier run
    fd, log_path = tempfile.mkstemp(prefix="virtiofsd-", suffix=".log")
    cmd = virtiofsd_command(binary, os.path.abspath(shared_dir), socket_path, sandbox=sandbox, cache=cache,
                            extra=extra)
    log.debug("starting %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
    finally:
        os.close(fd)
    daemon = Virtiofsd(proc, socket_path, shared_dir, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = daemon.output().strip().splitlines()
            daemon.stop()
            raise PyvmmError(f"virtiofsd exited with status {proc.returncode}: {text[-1] if text else 'no output'}")
        # It binds, listens, then says so (the C daemon) or serves (Rust); a connect here would use
        # up the one connection it accepts, so only look.
        if os.path.exists(socket_path) and ("Waiting for vhost-user socket" in daemon.output()
                                            or _is_rust(binary)):
            time.sleep(0.02)
            return daemon
        time.sleep(0.02)
    daemon.stop()
    raise PyvmmError(f"virtiofsd did not create {socket_path} within {timeout:g} s")


def share_options(daemons: Sequence[tuple[Virtiofsd, str]], *, memory: int, transport: str = "pci",
                  memdev: str = "pyvmm-mem") -> list[str]:
    """The options that attach each (daemon, tag): -chardev, -device vhost-user-fs-*, and shared guest RAM.

    ``memory`` is the guest's RAM size in bytes (the back-end must be exactly that big); ``transport``
    is ``pci`` or ``mmio``.  QEMU takes the same options.
    """
    driver = {"pci": "vhost-user-fs-pci", "mmio": "vhost-user-fs-device"}[transport]
    argv = ["-object", f"memory-backend-memfd,id={memdev},size={memory},share=on",
            "-machine", f"memory-backend={memdev}"]
    for n, (daemon, tag) in enumerate(daemons):
        path = daemon.socket_path.replace(",", ",,")
        argv += ["-chardev", f"socket,id=vfs{n},path={path}", "-device", f"{driver},chardev=vfs{n},tag={tag}"]
    return argv


__all__ = ["CANDIDATES", "Share", "Virtiofsd", "find_virtiofsd", "parse_share", "share_options",
           "start_virtiofsd", "virtiofsd_command"]
