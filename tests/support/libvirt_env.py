"""A private libvirtd for one test: Debian's libvirt 9.0 without systemd.

``LibvirtEnv`` starts ``virtlogd -d`` and ``libvirtd -d`` inside a private mount namespace
(``unshare -m``) whose /etc/libvirt, /run, /var/lib, /var/log and /var/cache are bind mounts of
directories under the test's tmp dir, and whose /etc/passwd and /etc/group have the
``libvirt-qemu`` entries libvirt's QEMU driver looks up.  ``qemu.conf`` runs the emulator as
root, with no cgroups, no namespaces and no security driver.  Clients (virsh, virt-install,
libvirt-python) reach the daemon from outside the namespace through the socket's path under
the tmp dir: :attr:`LibvirtEnv.uri`.

``virsh console`` wants a terminal: :class:`PtyProcess` runs a program on a pseudo-terminal
and reads it expect-style.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

PROGRAMS = ("libvirtd", "virtlogd", "virsh", "virt-install", "unshare", "mount")

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
stdio_handler = "logd"
"""

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
log_filters = "1:qemu.qemu_monitor 1:qemu.qemu_process 1:qemu.qemu_capabilities 3:util 3:rpc 3:conf 3:event"
"""


def require_programs() -> None:
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/bootstrap (libvirt-daemon, "
                    "libvirt-daemon-driver-qemu, libvirt-clients, virtinst, util-linux)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the libvirt test needs root (private mount namespace, libvirtd)", pytrace=False)


class LibvirtEnv:
    """libvirtd + virtlogd in a private mount namespace rooted at ``base``."""

    def __init__(self, base: Path) -> None:
        require_programs()
        self.base = base
        self.dirs = {"etc": base / "etc-libvirt", "run": base / "run", "lib": base / "var-lib",
                     "log": base / "var-log", "cache": base / "var-cache"}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        (self.dirs["etc"] / "qemu.conf").write_text(QEMU_CONF)
        (self.dirs["etc"] / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (self.dirs["etc"] / "virtlogd.conf").write_text("")
        (self.dirs["etc"] / "qemu").mkdir(exist_ok=True)
        for sub in ("libvirt/qemu", "libvirt/images"):
            (self.dirs["lib"] / sub).mkdir(parents=True, exist_ok=True)
        (self.dirs["log"] / "libvirt" / "qemu").mkdir(parents=True, exist_ok=True)
        self.passwd = base / "passwd"
        self.group = base / "group"
        qemu_user = "libvirt-qemu:x:64055:64055:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin"
        self.passwd.write_text(_with_entry(Path("/etc/passwd").read_text(), qemu_user))
        self.group.write_text(_with_entry(_with_entry(Path("/etc/group").read_text(), "libvirt-qemu:x:64055:"),
                                          "kvm:x:64056:"))
        self.socket = self.dirs["run"] / "libvirt" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self._started = False

    # -- daemons --------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        d = self.dirs
        mounts = [(d["etc"], "/etc/libvirt"), (d["run"], "/run"), (d["lib"], "/var/lib"), (d["log"], "/var/log"),
                  (d["cache"], "/var/cache"), (self.passwd, "/etc/passwd"), (self.group, "/etc/group")]
        script = "set -e; mount --make-rprivate /; "
        script += "".join(f"mount --bind {shlex.quote(str(src))} {dst}; " for src, dst in mounts)
        script += "mkdir -p /run/libvirt /run/lock; virtlogd -d; libvirtd -d"  # /var/lock is /run/lock
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"starting libvirtd failed ({proc.returncode}): {proc.stderr.strip()}", pytrace=False)
        self._started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.exists() and self.virsh("uri", check=False).returncode == 0:
                return
            time.sleep(0.2)
        pytest.fail(f"libvirtd did not come up in {timeout:.0f} s; log:\n{self.log_tail()}", pytrace=False)

    def pid(self, name: str) -> int | None:
        path = self.dirs["run"] / f"{name}.pid"
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().split()[0])
        return None

    def alive(self, name: str = "libvirtd") -> bool:
        pid = self.pid(name)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        with contextlib.suppress(OSError):
            return "(Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
        return False

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        for pidfile in (self.dirs["run"] / "libvirt" / "qemu").glob("*.pid"):  # domains left running
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        for name in ("libvirtd", "virtlogd"):
            pid = self.pid(name)
            if pid is None:
                continue
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._running(pid):
                time.sleep(0.1)
            if self._running(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _running(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True

    # -- clients --------------------------------------------------------------------------------
    def virsh(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip() or proc.stdout.strip()}\n--- libvirtd log:\n{self.log_tail()}")
        return proc

    def domain_log(self, name: str) -> str:
        path = self.dirs["log"] / "libvirt" / "qemu" / f"{name}.log"
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace")[-6000:]
        return ""

    def log_tail(self, n: int = 60) -> str:
        path = self.dirs["log"] / "libvirt" / "libvirtd.log"
        with contextlib.suppress(OSError):
            lines = path.read_text(errors="replace").splitlines()
            return "\n".join(line for line in lines if ": error :" in line or ": warning :" in line)[-4000:] \
                or "\n".join(lines[-n:])
        return "(no libvirtd log)"


def _with_entry(text: str, entry: str) -> str:
    name = entry.split(":", 1)[0]
    if any(line.split(":", 1)[0] == name for line in text.splitlines()):
        return text
    return text.rstrip("\n") + "\n" + entry + "\n"


class PtyProcess:
    """A program on a pseudo-terminal, read expect-style (``virsh console`` needs a terminal)."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            try:
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        self.buf = ""
        self.mark = 0
        self.eof = False

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            return False
        if not data:
            return False
        self.buf += data.decode(errors="replace")
        return True

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.buf, self.mark)
            if m:
                self.mark = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)):
                if left > 0:
                    self.eof = True
                m = rx.search(self.buf, self.mark)
                if m:
                    self.mark = m.end()
                    return m
                raise AssertionError(f"timed out waiting for {pattern!r}; console output:\n{self.buf[-3000:]}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGTERM)
        with contextlib.suppress(ChildProcessError, OSError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.05)
            else:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        with contextlib.suppress(OSError):
            os.close(self.fd)
