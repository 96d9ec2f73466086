"""Bad input gets a 4xx with a clear message and leaves nothing half-created; access control holds."""

from __future__ import annotations

import os
import sqlite3
import stat

import httpx
import pytest
from test_manager_support import (  # noqa: F401 - fixtures
    Daemon,
    daemon,
    free_port,
    guest_definition,
    manager_guest,
    wait_state,
)
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


def _rows(d) -> list[str]:
    with sqlite3.connect(str(d.state_dir / "pyvmmd.sqlite3")) as con:
        return [r[0] for r in con.execute("SELECT name FROM vms ORDER BY name")]


def test_unknown_vm(daemon):  # noqa: F811
    with daemon.http() as h:
        for method, path in (("GET", "/vms/ghost"), ("DELETE", "/vms/ghost"), ("POST", "/vms/ghost/start"),
                             ("POST", "/vms/ghost/shutdown"), ("POST", "/vms/ghost/destroy"),
                             ("POST", "/vms/ghost/suspend"), ("GET", "/vms/ghost/stats")):
            r = h.request(method, "/api/v1" + path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["detail"] == "no VM named 'ghost'"


def test_bad_definitions_leave_nothing(daemon, manager_guest, tmp_path):  # noqa: F811
    with daemon.http() as h:
        ok = guest_definition("good", manager_guest)
        assert h.post("/api/v1/vms", json=ok).status_code == 201

        r = h.post("/api/v1/vms", json=ok)
        assert r.status_code == 409 and "already exists" in r.json()["detail"]

        r = h.post("/api/v1/vms", json={**ok, "name": "bigmem", "memory_mib": 0})
        assert r.status_code == 422
        assert any(e["loc"][-1] == "memory_mib" and "greater than or equal to 2" in e["msg"]
                   for e in r.json()["detail"])
        r = h.post("/api/v1/vms", json={**ok, "name": "strmem", "memory_mib": "lots"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "memory_mib"

        missing = tmp_path / "no-such-kernel"
        r = h.post("/api/v1/vms", json={**ok, "name": "nokernel", "kernel": str(missing)})
        assert r.status_code == 400 and r.json()["detail"] == f"kernel {missing}: no such file"
        r = h.post("/api/v1/vms", json={**ok, "name": "relkernel", "kernel": "vmlinuz"})
        assert r.status_code == 422 and "absolute path" in r.text
        r = h.post("/api/v1/vms", json={**ok, "name": "bad name!"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "name"
        r = h.post("/api/v1/vms", json={**ok, "name": "extra", "colour": "blue"})
        assert r.status_code == 422 and "colour" in r.text
        r = h.post("/api/v1/vms", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422

        assert [v["name"] for v in h.get("/api/v1/vms").json()] == ["good"]
        assert _rows(daemon) == ["good"]


def test_wrong_state_and_vanished_kernel(daemon, manager_guest, tmp_path):  # noqa: F811
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(manager_guest.read_bytes())
    with daemon.http() as h:
        assert h.post("/api/v1/vms", json=guest_definition("vm1", kernel)).status_code == 201
        for op in ("shutdown", "destroy", "suspend", "resume", "reboot"):
            r = h.post(f"/api/v1/vms/vm1/{op}")
            assert r.status_code == 409 and r.json()["detail"] == f"cannot {op} VM vm1: it is shutoff"
        assert h.post("/api/v1/vms/vm1/start").status_code == 200
        r = h.post("/api/v1/vms/vm1/start")
        assert r.status_code == 409 and "it is running" in r.json()["detail"]
        r = h.delete("/api/v1/vms/vm1")
        assert r.status_code == 409 and "cannot undefine VM vm1: it is running" == r.json()["detail"]
        r = h.post("/api/v1/vms/vm1/resume")
        assert r.status_code == 409
        assert h.post("/api/v1/vms/vm1/destroy").status_code == 200

        kernel.unlink()
        r = h.post("/api/v1/vms/vm1/start")
        assert r.status_code == 409 and "no such file" in r.json()["detail"]
        assert h.get("/api/v1/vms/vm1").json()["state"] == "shutoff"
        assert daemon.vm_pids() == []

        # A file that is no kernel: refused when it is defined, in one line.
        junk = tmp_path / "junk"
        junk.write_bytes(b"\0" * 4096)
        r = h.post("/api/v1/vms", json=guest_definition("junk", junk))
        assert r.status_code == 400 and r.json()["detail"] == (
            f"kernel {junk}: unrecognised image format (not a Linux bzImage, ELF, multiboot kernel or boot sector)")
        # One that looks like a kernel but is broken: the VM process fails, and its error line is the reason.
        junk.write_bytes(b"\x7fELF" + b"\0" * 4096)
        assert h.post("/api/v1/vms", json=guest_definition("junk", junk)).status_code == 201
        r = h.post("/api/v1/vms/junk/start")
        assert r.status_code == 409, r.text
        assert r.json()["detail"].startswith(f"VM junk failed to start: kernel {junk}: corrupt ELF file"), r.text
        assert "|" not in r.json()["detail"] and "serial0" not in r.json()["detail"]
        assert h.get("/api/v1/vms/junk").json()["state"] == "shutoff"

        # A disk image that vanished: refused before any process is started.
        disk = tmp_path / "disk.img"
        disk.write_bytes(b"\0" * 65536)
        assert h.post("/api/v1/vms", json=guest_definition("disk", manager_guest,
                                                           disks=[{"path": str(disk)}])).status_code == 201
        disk.unlink()
        r = h.post("/api/v1/vms/disk/start")
        assert r.status_code == 409 and r.json()["detail"] == f"VM disk cannot start: disks[0] {disk}: no such file"
        assert daemon.vm_pids() == []


def test_socket_mode_and_tcp_token(tmp_path, manager_guest):  # noqa: F811
    d = Daemon(tmp_path / "state", tcp_port=free_port())
    d.start()
    try:
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
        for private in ("pyvmmd.sqlite3", "token"):
            assert stat.S_IMODE(os.stat(d.state_dir / private).st_mode) == 0o600, private
        assert stat.S_IMODE(os.stat(d.state_dir / "run").st_mode) == 0o700
        r = httpx.get(d.url + "/api/v1/vms")
        assert r.status_code == 401 and "token" in r.json()["detail"]
        r = httpx.get(d.url + "/api/v1/vms", headers={"authorization": "Bearer wrong-token-xxxxxxxxxxxx"})
        assert r.status_code == 401
        r = httpx.get(d.url + "/api/v1/vms", headers={"authorization": f"Bearer {d.token}"})
        assert r.status_code == 200 and r.json() == []
        assert httpx.get(d.url + "/").status_code == 200  # the page itself holds no data
        with pytest.raises(InvalidStatus) as e:
            connect(f"ws://127.0.0.1:{d.tcp_port}/api/v1/events/ws")
        assert e.value.response.status_code == 403
        with connect(f"ws://127.0.0.1:{d.tcp_port}/api/v1/events/ws?token={d.token}") as ws:
            assert ws.protocol.state.name == "OPEN"
    finally:
        d.cleanup()


def test_vm_process_privileges(daemon, manager_guest):  # noqa: F811
    """The VM runs in its own session with a cleaned environment and no inherited descriptors."""
    with daemon.http() as h:
        h.post("/api/v1/vms", json=guest_definition("priv", manager_guest))
        pid = h.post("/api/v1/vms/priv/start").json()["vm"]["pid"]
        try:
            assert os.getsid(pid) == pid
            env = dict(x.split("=", 1) for x in open(f"/proc/{pid}/environ").read().split("\0") if "=" in x)
            assert set(env) <= {"PATH", "LANG", "PYTHONUNBUFFERED", "PYTHONPATH"}, env
            # stdin is /dev/null, stdout/stderr the VM log; the daemon's sockets and database are not inherited
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                assert "pyvmmd.sqlite3" not in target and "pyvmmd.sock" not in target, target
            assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        finally:
            h.post("/api/v1/vms/priv/destroy")
