"""Shared helpers for the manager tests (no tests here): a real pyvmmd in a temporary directory.

The daemon runs as a separate process exactly as a user would run it; VMs are
real ``pyvmm run`` processes booting the QMP test guest of tests/support/guests/qmp (a
multiboot kernel printing ``tick N`` ten times a second and powering off on
the ACPI power button) on KVM.  Teardown kills whatever VM processes the
daemon left, even if the test killed the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "guests" / "qmp"))

from harness import build_guest  # noqa: E402

from pyvmm.manager.client import Client  # noqa: E402

ACCEL = os.environ.get("PYVMM_QMP_ACCEL", "kvm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One pyvmmd process with its own state directory."""

    def __init__(self, state_dir: Path, tcp_port: int | None = None) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "pyvmmd.sock"
        self.tcp_port = tcp_port
        self.token = "test-token-0123456789abcdef" if tcp_port else None
        self.log = state_dir.parent / f"{state_dir.name}-pyvmmd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host_state_dir(self) -> Path:
        """The state directory as the test sees it (a subclass may run the daemon in another mount namespace)."""
        return self.state_dir

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.tcp_port}"

    def command(self) -> list[str]:
        """The daemon's command line (subclasses add options or a prefix)."""
        return [sys.executable, "-m", "pyvmm.manager.daemon", "--state-dir", str(self.state_dir)]

    def start(self, timeout: float = 20.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        if self.tcp_port:
            (self.state_dir / "token").write_text(self.token + "\n")
            (self.state_dir / "token").chmod(0o600)
            cmd += ["--listen", f"127.0.0.1:{self.tcp_port}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"pyvmmd exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with self.client() as c:
                    c.request("GET", "/version")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"pyvmmd did not answer within {timeout}s:\n{self.log_text()}") from None
                time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    @contextlib.contextmanager
    def client(self):
        c = Client(socket_path=self.socket, timeout=30)
        try:
            yield c
        finally:
            c.close()

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://pyvmmd",
                            timeout=30, **kw)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def vm_records(self) -> list[tuple[str, int]]:
        """(uuid, pid) of the VM processes the store knows about (readable while the daemon is dead)."""
        db = self.host_state_dir / "pyvmmd.sqlite3"
        if not db.exists():
            return []
        with contextlib.closing(sqlite3.connect(str(db))) as con:
            return [(r[0], r[1]) for r in con.execute("SELECT uuid, pid FROM runtime")]

    def vm_pids(self) -> list[int]:
        return [pid for _, pid in self.vm_records()]

    def cleanup(self) -> None:
        """Stop the daemon and kill every VM it left (a stopped daemon leaves its VMs running, by design)."""
        records = self.vm_records()
        self.stop()
        records += [r for r in self.vm_records() if r not in records]
        for uuid, pid in records:
            with contextlib.suppress(OSError):
                # Only a process that still names this VM's uuid (pids are reused).
                if uuid.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def manager_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The QMP test guest (built once per session)."""
    return build_guest(tmp_path_factory.mktemp("manager-guest"))


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "state")
    d.start()
    try:
        yield d
    finally:
        d.cleanup()


def guest_definition(name: str, kernel: Path, **extra) -> dict:
    return {"name": name, "kernel": str(kernel), "memory_mib": 64, "accel": ACCEL, **extra}


def wait_for(pred: Callable[[], object], timeout: float, what: str, diag: Callable[[], str] = lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{diag()}")
        time.sleep(0.05)


def wait_state(c: Client, name: str, state: str, timeout: float = 15.0) -> dict:
    last: dict = {}

    def check():
        nonlocal last
        last = c.get(name)
        return last if last["state"] == state else None

    return wait_for(check, timeout, f"VM {name} to be {state}", lambda: json.dumps(last))


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"
