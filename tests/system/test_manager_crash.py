"""Daemon crash: kill -9 pyvmmd while a VM runs, restart it, and the VM is re-attached and controllable."""

from __future__ import annotations

import os
import time

from test_manager_lifecycle import ConsoleReader
from test_manager_support import (  # noqa: F401 - fixtures
    Daemon,
    guest_definition,
    manager_guest,
    pid_alive,
    wait_for,
    wait_state,
)


def test_daemon_kill9_and_reattach(tmp_path, manager_guest):  # noqa: F811
    d = Daemon(tmp_path / "state")
    d.start()
    try:
        with d.client() as c:
            c.define(guest_definition("survivor", manager_guest))
            c.define(guest_definition("idle", manager_guest))
            pid = c.action("survivor", "start")["vm"]["pid"]
            console = ConsoleReader(d.socket, "survivor")
            console.wait(b"tick")
        d.kill9()
        # The VM outlives its daemon.
        time.sleep(0.5)
        assert pid_alive(pid), "the VM process died with the daemon"

        d.start()
        with d.client() as c:
            vms = {v["name"]: v for v in c.list()}
            assert vms["survivor"]["state"] == "running" and vms["survivor"]["pid"] == pid
            assert vms["idle"]["state"] == "shutoff"
            # The new daemon reconnected the serial port: new output reaches a new console.
            console2 = ConsoleReader(d.socket, "survivor")
            mark = len(console2.text())
            console2.wait(b"tick", start=mark)
            # ... and QMP: suspend/resume/destroy work.
            assert c.action("survivor", "suspend")["vm"]["state"] == "paused"
            assert c.action("survivor", "resume")["vm"]["state"] == "running"
            stats = wait_for(lambda: c.stats("survivor")["current"], 5, "stats after re-attach")
            assert stats["cpu_time_s"] > 0
            # A second crash while paused, then a clean restart, keeps the paused state.
            c.action("survivor", "suspend")
        d.kill9()
        d.start()
        with d.client() as c:
            assert c.get("survivor")["state"] == "paused"
            c.action("survivor", "resume")
            vm = c.action("survivor", "destroy")["vm"]
            assert vm["state"] == "shutoff" and vm["pid"] is None
            wait_for(lambda: not pid_alive(pid), 5, "the VM process to be gone after destroy")
            # The VM can be started again under the new daemon.
            c.action("survivor", "start")
            c.action("survivor", "shutdown", timeout=10)
            wait_state(c, "survivor", "shutoff")
        console.close()
        console2.close()
    finally:
        d.cleanup()


def test_dead_vm_is_noticed_after_restart(tmp_path, manager_guest):  # noqa: F811
    """A VM that dies while the daemon is down is reported shut off, and its runtime record is dropped."""
    d = Daemon(tmp_path / "state")
    d.start()
    try:
        with d.client() as c:
            c.define(guest_definition("gone", manager_guest))
            pid = c.action("gone", "start")["vm"]["pid"]
        d.kill9()
        os.kill(pid, 9)
        wait_for(lambda: not pid_alive(pid), 5, "the VM to die")
        d.start()
        with d.client() as c:
            vm = c.get("gone")
            assert vm["state"] == "shutoff" and vm["pid"] is None
            assert "daemon was down" in vm["reason"]
        assert d.vm_pids() == []
    finally:
        d.cleanup()
