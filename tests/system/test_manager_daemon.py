"""Daemon features around the life cycle: SSE events, autostart, TLS on TCP, the console on a real terminal."""

from __future__ import annotations

import os
import pty
import ssl
import subprocess
import sys
import termios
import time

import httpx
from test_manager_support import (  # noqa: F401 - fixtures
    Daemon,
    daemon,
    free_port,
    guest_definition,
    manager_guest,
    wait_for,
    wait_state,
)


def test_sse_events(daemon, manager_guest):  # noqa: F811
    with daemon.http() as h, h.stream("GET", "/api/v1/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines).startswith(": pyvmmd events")
        with daemon.client() as c:
            c.define(guest_definition("ssevm", manager_guest))
        got = []
        for line in lines:
            got.append(line)
            if line.startswith("data:"):
                break
        assert "event: defined" in got and '"uuid"' in got[-1]


def test_autostart(tmp_path, manager_guest):  # noqa: F811
    d = Daemon(tmp_path / "state")
    d.start()
    try:
        with d.client() as c:
            c.define(guest_definition("auto", manager_guest, autostart=True))
            c.define(guest_definition("manual", manager_guest))
            assert c.get("auto")["state"] == "shutoff"  # autostart acts when the daemon starts
        d.stop()  # a graceful stop, no VM running
        d.start()
        with d.client() as c:
            assert c.get("auto")["state"] == "running"
            assert c.get("manual")["state"] == "shutoff"
        # A graceful daemon stop leaves running VMs running; the next daemon re-attaches.
        with d.client() as c:
            pid = c.get("auto")["pid"]
        d.stop()
        assert os.path.exists(f"/proc/{pid}")
        d.start()
        with d.client() as c:
            vm = c.get("auto")
            assert vm["state"] == "running" and vm["pid"] == pid  # re-attached, not started twice
            c.action("auto", "destroy")
    finally:
        d.cleanup()


def test_tls_listener(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    (state / "token").write_text("tls-token-0123456789abcdef\n")
    (state / "token").chmod(0o644)
    refused = subprocess.run([sys.executable, "-m", "pyvmm.manager.daemon", "--state-dir", str(state),
                              "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "readable by other users" in refused.stderr
    (state / "token").chmod(0o600)
    log = open(tmp_path / "d.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm.manager.daemon", "--state-dir", str(state),
                             "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key)],
                            stdout=log, stderr=log)
    try:
        url = f"https://127.0.0.1:{port}/api/v1/vms"

        def up():
            try:
                return httpx.get(url, verify=False).status_code
            except httpx.TransportError:
                return None

        assert wait_for(up, 20, "the TLS listener", lambda: (tmp_path / "d.log").read_text()) == 401
        r = httpx.get(url, verify=ssl.create_default_context(cafile=str(cert)),
                      headers={"authorization": "Bearer tls-token-0123456789abcdef"})
        assert r.status_code == 200 and r.json() == []
        try:  # plain HTTP on the TLS port does not work
            assert httpx.get(f"http://127.0.0.1:{port}/api/v1/vms").status_code != 200
        except httpx.TransportError:
            pass
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_console_on_a_terminal_restores_it(daemon, manager_guest):  # noqa: F811
    """`pyvmm vm console` puts the terminal in raw mode and restores it when Ctrl-] detaches."""
    with daemon.client() as c:
        c.define(guest_definition("ttyvm", manager_guest))
        c.action("ttyvm", "start")
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    env = {**os.environ, "PYVMMD_SOCKET": str(daemon.socket)}
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "vm", "console", "ttyvm"], stdin=slave, stdout=slave,
                            stderr=slave, env=env)
    try:
        out = b""
        deadline = time.monotonic() + 15
        while b"tick" not in out and time.monotonic() < deadline:
            out += os.read(master, 4096)
        assert b"tick" in out
        raw = termios.tcgetattr(slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO, "the terminal is not in raw mode"
        os.write(master, b"\x1d")
        assert proc.wait(10) == 0
        assert termios.tcgetattr(slave) == before, "the terminal was not restored"
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)


def test_shutdown_timeout_destroys(daemon, manager_guest):  # noqa: F811
    """A guest that does not react to the power button (here: paused) is destroyed after the timeout."""
    with daemon.client() as c:
        c.define(guest_definition("stubborn", manager_guest))
        pid = c.action("stubborn", "start")["vm"]["pid"]
        c.action("stubborn", "suspend")
        t0 = time.monotonic()
        assert c.action("stubborn", "shutdown", timeout=1.5)["vm"]["state"] == "in shutdown"
        vm = wait_state(c, "stubborn", "shutoff", timeout=15)
        assert time.monotonic() - t0 >= 1.4
        assert vm["reason"] == "destroyed" and vm["pid"] is None
        assert not os.path.exists(f"/proc/{pid}/cmdline") or not open(f"/proc/{pid}/cmdline", "rb").read()
