"""The whole life cycle of a VM on a real pyvmmd: define, start, console, suspend, resume, reboot, shutdown.

Also the virsh-style CLI (``pyvmm vm ...``) against the same daemon, including
``pyvmm vm console`` detaching on Ctrl-].
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time

from test_manager_support import (  # noqa: F401 - fixtures
    daemon,
    guest_definition,
    manager_guest,
    wait_for,
    wait_state,
)
from websockets.sync.client import unix_connect

TICK = re.compile(rb"tick (\d+)")


class ConsoleReader:
    """A WebSocket console client collecting everything it receives in a background thread."""

    def __init__(self, socket_path, name: str) -> None:
        self.ws = unix_connect(str(socket_path), f"ws://pyvmmd/api/v1/vms/{name}/console").__enter__()
        self.data = b""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                msg = self.ws.recv()
                with self._lock:
                    self.data += msg if isinstance(msg, bytes) else msg.encode()
        except Exception:
            pass

    def text(self) -> bytes:
        with self._lock:
            return self.data

    def ticks(self) -> list[int]:
        return [int(m) for m in TICK.findall(self.text())]

    def wait(self, pattern: bytes, timeout: float = 15.0, start: int = 0) -> None:
        wait_for(lambda: pattern in self.text()[start:], timeout, f"{pattern!r} on the console",
                 lambda: self.text()[-500:].decode(errors="replace"))

    def close(self) -> None:
        self.ws.close()


class EventReader(ConsoleReader):
    def __init__(self, socket_path) -> None:
        self.ws = unix_connect(str(socket_path), "ws://pyvmmd/api/v1/events/ws").__enter__()
        self.events: list[dict] = []
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        try:
            while True:
                self.events.append(json.loads(self.ws.recv()))
        except Exception:
            pass

    def states(self) -> list[str]:
        return [e["state"] for e in self.events if e["name"] == "state"]


def test_lifecycle(daemon, manager_guest):  # noqa: F811
    events = EventReader(daemon.socket)
    with daemon.client() as c:
        vm = c.define(guest_definition("life", manager_guest))
        assert vm["state"] == "shutoff" and vm["pid"] is None
        assert [v["name"] for v in c.list()] == ["life"]
        console = ConsoleReader(daemon.socket, "life")  # opened before start: sees the whole boot

        res = c.action("life", "start")
        assert res["vm"]["state"] == "running"
        pid = res["vm"]["pid"]
        assert pid and os.path.exists(f"/proc/{pid}")
        # Its own session: killing the daemon's process group cannot take the VM along.
        assert os.getsid(pid) == pid
        console.wait(b"tick 3")
        # The daemon connects the serial port before the machine powers on: nothing of the boot is lost.
        assert console.text().lstrip().startswith(b"QMPGUEST BOOT"), console.text()[:200]
        assert c.request("GET", "/vms/life/console/scrollback")["text"].lstrip().startswith("QMPGUEST BOOT")

        # suspend: ticks stop; resume: they continue from where they were.
        assert c.action("life", "suspend")["vm"]["state"] == "paused"
        time.sleep(0.3)
        paused_at = max(console.ticks())
        time.sleep(1.0)
        assert max(console.ticks()) == paused_at, "the guest kept printing while paused"
        assert c.get("life")["state"] == "paused"
        assert c.action("life", "resume")["vm"]["state"] == "running"
        wait_for(lambda: max(console.ticks()) >= paused_at + 3, 10, "ticks after resume")

        # stats from /proc
        st = wait_for(lambda: c.stats("life")["current"], 5, "a stats sample")
        assert st["cpu_time_s"] > 0 and st["rss_bytes"] > 1 << 20 and st["memory_mib"] == 64

        # reboot: the guest boots again (its tick counter restarts)
        mark = len(console.text())
        c.action("life", "reboot")
        console.wait(b"QMPGUEST BOOT", start=mark)
        assert c.get("life")["state"] == "running"

        # graceful shutdown: the guest sees the power button and enters S5
        assert c.action("life", "shutdown")["vm"]["state"] in ("in shutdown", "shutoff")
        vm = wait_state(c, "life", "shutoff")
        assert vm["pid"] is None and vm["reason"] == "guest-shutdown"
        console.wait(b"POWER BUTTON")
        wait_for(lambda: not os.path.exists(f"/proc/{pid}/cmdline") or
                 not open(f"/proc/{pid}/cmdline", "rb").read(), 5, "the VM process to be gone")

        # the console survives: start again and the same WebSocket sees the new boot
        mark = len(console.text())
        c.action("life", "start")
        console.wait(b"tick", start=mark)
        assert c.action("life", "destroy")["vm"]["state"] == "shutoff"
        assert c.get("life")["reason"] == "destroyed"

        c.undefine("life")
        assert c.list() == []
        console.close()
    wait_for(lambda: {"running", "paused", "in shutdown", "shutoff"} <= set(events.states()), 5,
             "state-change events", lambda: str(events.events))
    events.close()


def _pyvmm(daemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:  # noqa: F811
    env = {**os.environ, "PYVMMD_SOCKET": str(daemon.socket)}
    return subprocess.run([sys.executable, "-m", "pyvmm", "vm", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_cli(daemon, manager_guest):  # noqa: F811
    r = _pyvmm(daemon, "define", "clivm", "--kernel", str(manager_guest), "--memory", "64M", "--accel", "kvm"
               if os.environ.get("PYVMM_QMP_ACCEL", "kvm") == "kvm" else "tcg")
    assert r.returncode == 0, r.stderr
    assert "clivm" in r.stdout
    r = _pyvmm(daemon, "list", "--all")
    assert r.returncode == 0 and re.search(r"clivm\s+shutoff", r.stdout), r.stdout
    assert _pyvmm(daemon, "start", "clivm").returncode == 0
    r = _pyvmm(daemon, "--json", "list")
    listed = json.loads(r.stdout)
    assert [v["name"] for v in listed] == ["clivm"] and listed[0]["state"] == "running"
    r = _pyvmm(daemon, "info", "clivm")
    assert re.search(r"State:\s+running", r.stdout) and re.search(r"Max memory:\s+64 MiB", r.stdout), r.stdout

    # console: output arrives, Ctrl-] detaches with status 0
    env = {**os.environ, "PYVMMD_SOCKET": str(daemon.socket)}
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "vm", "console", "clivm"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = b""
    deadline = time.monotonic() + 15
    while b"tick" not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            out += os.read(proc.stdout.fileno(), 4096)
    assert b"tick" in out, out
    proc.stdin.write(b"\x1d")
    proc.stdin.flush()
    assert proc.wait(10) == 0

    for op, state in (("suspend", "paused"), ("resume", "running")):
        r = _pyvmm(daemon, op, "clivm")
        assert r.returncode == 0 and f"now {state}" in r.stdout, r.stdout + r.stderr
    r = _pyvmm(daemon, "shutdown", "clivm", "--wait", "--timeout", "20")
    assert r.returncode == 0 and "now shutoff" in r.stdout, r.stdout + r.stderr
    r = _pyvmm(daemon, "start", "nosuchvm")
    assert r.returncode == 1 and "no VM named 'nosuchvm'" in r.stderr
    assert _pyvmm(daemon, "undefine", "clivm").returncode == 0
