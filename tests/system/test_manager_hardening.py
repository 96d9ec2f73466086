"""The manager against hostile clients, a full disk, lost records and a log flood (issue 11).

Every test runs a real pyvmmd; VMs are real ``pyvmm run`` processes booting the QMP test guest.

* A 100 MB body (with a Content-Length, or chunked) is refused with 413 before it is read: the
  daemon's peak RSS stays small.
* The request models are strict: ``1e999``, NaN, ``"2"`` and ``true`` for integers are 422s.
* On a full disk (the state directory on a small tmpfs, mounted in a private mount namespace)
  define and start answer 507 with a message; a VM whose process could not be recorded is
  stopped, never left running untracked or "starting"; after the space is freed and the daemon
  restarts, the VM runs once.
* A VM process the daemon lost its record of (it died before writing it) is found again by its
  VM lock after a restart and never started twice.
* A VM process that floods its log: vm.log stays capped and rotated, and the accelerator line
  stays readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_manager_support import (  # noqa: F401 - fixtures
    Daemon,
    daemon,
    guest_definition,
    manager_guest,
    wait_for,
    wait_state,
)

BODY_BYTES = 100_000_000
LIMIT = 1 << 20


def processes_naming(uuid: str) -> list[int]:
    """Live VM processes whose command line names ``uuid`` (the daemon's runtime records aside)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            if stat[stat.rfind(")") + 2] in "ZX":
                continue
            if argv[0] != b"sh" and any(uuid.encode() in a for a in argv) and b"run" in argv:
                pids.append(int(entry.name))
    return pids


def kill_all(uuids: list[str]) -> None:
    for uuid in uuids:
        for pid in processes_naming(uuid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def raw_request(sock_path: Path, head: bytes, body_chunks, timeout: float = 60.0) -> tuple[int, bytes, int]:
    """Send ``head`` then the body chunks on a unix socket while reading the answer.
    Returns (status, response body, body bytes the daemon took before it answered and closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    sent = 0

    def sender() -> None:
        nonlocal sent
        with contextlib.suppress(OSError):
            s.sendall(head)
            for chunk in body_chunks:
                s.sendall(chunk)
                sent += len(chunk)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            more = s.recv(65536)
            if not more:
                break
            data += more
    s.close()
    t.join(30)
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    status = int(data.split(b" ", 2)[1])
    return status, data[data.index(b"\r\n\r\n") + 4:], sent


def _length(data: bytes) -> int:
    head = data[:data.index(b"\r\n\r\n")].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_huge_bodies_are_refused_before_they_are_read(daemon):  # noqa: F811
    assert daemon.proc is not None
    before = peak_rss_kib(daemon.proc.pid)
    chunk = b"x" * (1 << 20)
    head = (b"POST /api/v1/vms HTTP/1.1\r\nHost: pyvmmd\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY_BYTES)
    status, body, _ = raw_request(daemon.socket, head, (chunk for _ in range(BODY_BYTES // len(chunk))))
    assert status == 413, body
    assert "too large" in json.loads(body)["detail"]
    # Chunked: no length up front; refused once past the limit.
    head = (b"POST /api/v1/vms HTTP/1.1\r\nHost: pyvmmd\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    status, body, _ = raw_request(daemon.socket, head, (frame for _ in range(BODY_BYTES // len(chunk))))
    assert status == 413, body
    assert "too large" in json.loads(body)["detail"]
    grown_mib = (peak_rss_kib(daemon.proc.pid) - before) / 1024
    assert grown_mib < 20, f"the daemon's peak RSS grew by {grown_mib:.0f} MiB for a refused body"
    # A body under the limit is still read and validated, and the daemon still answers.
    with daemon.http() as h:
        r = h.post("/api/v1/vms", content=json.dumps({"name": "x" * 100}))
        assert r.status_code == 422, r.text
        assert h.get("/api/v1/version").status_code == 200


@pytest.mark.parametrize("field,raw", [("memory_mib", "1e999"), ("memory_mib", "NaN"), ("memory_mib", "-Infinity"),
                                       ("memory_mib", "64.0"), ("vcpus", '"2"'), ("vcpus", "true"),
                                       ("autostart", "1"), ("autostart", '"yes"')])
def test_request_models_are_strict(daemon, manager_guest, field, raw):  # noqa: F811
    doc = f'{{"name": "strict", "kernel": "{manager_guest}", "{field}": {raw}}}'
    with daemon.http() as h:
        r = h.post("/api/v1/vms", content=doc, headers={"content-type": "application/json"})
        assert r.status_code == 422, (r.status_code, r.text)
        detail = r.json()["detail"]
        assert any(e["loc"][-1] == field for e in detail), detail
        assert h.get("/api/v1/vms/strict").status_code == 404
        # ... and the same for a definition's update.
        ok = h.post("/api/v1/vms", json=guest_definition("strict", manager_guest))
        assert ok.status_code == 201, ok.text
        stored = h.get("/api/v1/vms/strict/definition").json()
        r = h.put("/api/v1/vms/strict", content=doc, headers={"content-type": "application/json"})
        assert r.status_code == 422, (r.status_code, r.text)
        assert h.get("/api/v1/vms/strict/definition").json() == stored


class NamespacedDaemon(Daemon):
    """A pyvmmd whose state directory is a small tmpfs, mounted in a private mount namespace.

    A ``sleep`` holds the namespace across daemon restarts; the daemon (and its VMs) run in it
    through ``nsenter``, and the test reaches the tmpfs through ``/proc/HOLDER/root``.  The API
    socket lives outside the tmpfs, where both sides see it."""

    def __init__(self, tmp: Path, size: str = "16m") -> None:
        super().__init__(tmp / "state")
        self.socket = tmp / "d.sock"
        self.state_dir.mkdir()
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs -o size={size},mode=0700 tmpfs "{self.state_dir}" && echo ok && exec sleep 3600'],
            stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        assert line.strip() == "ok", f"cannot mount a tmpfs in a mount namespace: {line!r}"
        self.filler = self.host_state_dir / "filler"

    @property
    def host_state_dir(self) -> Path:
        return Path(f"/proc/{self.holder.pid}/root{self.state_dir}")

    def command(self) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--", *super().command(),
                "--socket", str(self.socket)]

    def vm_records(self) -> list[tuple[str, int]]:
        # SQLite resolves the /proc/PID/root link to "/" (the test's own view): read a copy instead.
        copy = self.state_dir.parent / "store-copy"
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        for suffix in ("", "-wal"):
            src = self.host_state_dir / f"pyvmmd.sqlite3{suffix}"
            if src.exists():
                shutil.copyfile(src, copy / src.name)
        if not (copy / "pyvmmd.sqlite3").exists():
            return []
        with contextlib.closing(sqlite3.connect(str(copy / "pyvmmd.sqlite3"))) as con:
            return [(r[0], r[1]) for r in con.execute("SELECT uuid, pid FROM runtime")]

    def fill(self) -> None:
        """Fill the tmpfs to the last byte."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 65536, 4096, 512, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def cleanup(self) -> None:
        super().cleanup()
        self.holder.kill()
        self.holder.wait(5)


def test_full_disk_gives_clear_errors_and_no_untracked_vm(tmp_path, manager_guest):  # noqa: F811
    d = NamespacedDaemon(tmp_path)
    uuids: list[str] = []
    try:
        d.start()
        with d.http() as h:
            r = h.post("/api/v1/vms", json=guest_definition("full", manager_guest, autostart=True))
            assert r.status_code == 201, r.text
            uuid = r.json()["uuid"]
            uuids.append(uuid)
            d.fill()
            r = h.post("/api/v1/vms", json=guest_definition("another", manager_guest))
            assert r.status_code == 507, (r.status_code, r.text)
            assert "disk is full" in r.json()["detail"], r.text
            r = h.post("/api/v1/vms/full/start")
            assert r.status_code == 507, (r.status_code, r.text)
            assert "disk is full" in r.json()["detail"] and "stopped" in r.json()["detail"], r.text
            vm = h.get("/api/v1/vms/full").json()
            assert vm["state"] == "shutoff" and vm["pid"] is None, vm
            assert "disk is full" in vm["reason"], vm
            wait_for(lambda: not processes_naming(uuid), 5, "the unrecorded VM process to be stopped",
                     lambda: str(processes_naming(uuid)))
            # Every other route still answers JSON.
            assert h.get("/api/v1/vms").status_code == 200
            assert h.get("/api/v1/vms/full/log").status_code == 200
            r = h.put("/api/v1/vms/full", json=guest_definition("full", manager_guest, vcpus=2))
            assert r.status_code == 507, (r.status_code, r.text)
            assert h.get("/api/v1/vms/another").status_code == 404
        # Space back, the daemon restarted: the VM autostarts, and runs exactly once.
        d.free()
        d.kill9()
        d.start()
        with d.client() as c:
            vm = wait_state(c, "full", "running")
            time.sleep(1.0)
            assert processes_naming(uuid) == [vm["pid"]], (processes_naming(uuid), vm)
            # A VM that ends while the disk is full is reported ended, not left "running".
            d.fill()
            r = c.action("full", "destroy")
            assert r["vm"]["state"] == "shutoff", r
            wait_for(lambda: not processes_naming(uuid), 5, "the destroyed VM to be gone")
            d.free()
            c.action("full", "start")
            assert len(processes_naming(uuid)) == 1
    finally:
        d.cleanup()
        kill_all(uuids)


def test_lost_record_vm_is_found_not_started_twice(tmp_path, manager_guest):  # noqa: F811
    """A daemon that died between starting a VM and recording it: its successor finds the VM by its lock."""
    d = Daemon(tmp_path / "state")
    uuids: list[str] = []
    try:
        d.start()
        with d.client() as c:
            vm = c.define(guest_definition("lost", manager_guest, autostart=True))
            uuids.append(vm["uuid"])
            pid = c.action("lost", "start")["vm"]["pid"]
        d.kill9()
        with contextlib.closing(sqlite3.connect(str(d.state_dir / "pyvmmd.sqlite3"))) as db:
            db.execute("DELETE FROM runtime")
            db.commit()
        d.start()
        with d.client() as c:
            vm = c.get("lost")
            assert vm["state"] == "running" and vm["pid"] == pid, vm
            with d.http() as h:
                r = h.post("/api/v1/vms/lost/start")
                assert r.status_code == 409, r.text
            assert processes_naming(vm["uuid"]) == [pid]
            # It is controllable: QMP and the record are back.
            assert c.action("lost", "suspend")["vm"]["state"] == "paused"
            assert d.vm_pids() == [pid]
            c.action("lost", "destroy")
            wait_for(lambda: not processes_naming(vm["uuid"]), 5, "the VM to be gone")
    finally:
        d.cleanup()
        kill_all(uuids)


FLOOD_MIB = 20


class FloodingDaemon(Daemon):
    """A pyvmmd whose VM processes write FLOOD_MIB MiB to their log once they are up (a VMM gone chatty)."""

    def command(self) -> list[str]:
        flood = (f'( sleep 1; i=0; while [ $i -lt {FLOOD_MIB * 16} ]; do head -c 65536 /dev/zero | tr "\\0" x; '
                 'echo; i=$((i+1)); done ) >&2 & exec "$@"')
        runner = f"sh -c '{flood}' flood {sys.executable} -m pyvmm run"
        return [*super().command(), "--pyvmm-command", runner]


def test_vm_log_flood_is_capped_and_rotated(tmp_path, manager_guest):  # noqa: F811
    d = FloodingDaemon(tmp_path / "state")
    uuids: list[str] = []
    try:
        d.start()
        with d.client() as c:
            vm = c.define(guest_definition("chatty", manager_guest))
            uuids.append(vm["uuid"])
            vm = c.action("chatty", "start")["vm"]
            assert vm["accelerator"], vm
            run = d.state_dir / "run" / vm["uuid"]
            logs = [run / "vm.log", run / "vm.log.1"]

            def sizes() -> list[int]:
                return [p.stat().st_size if p.exists() else 0 for p in logs]

            def flooder_done() -> bool:
                return not any(_argv0(p) == b"sh" for p in _children_of(vm["pid"]))

            time.sleep(1.5)
            wait_for(flooder_done, 60, "the flood to end", lambda: str(sizes()))
            time.sleep(0.5)
            assert c.get("chatty")["state"] == "running"
            assert sizes()[0] <= LIMIT and sizes()[1] <= LIMIT, sizes()
            assert sizes()[1] > 0, f"never rotated: {sizes()}"
            text = logs[0].read_text(errors="replace")
            assert "accelerator:" in text.split("log rotated")[0], text[:2000]
        # A restarted daemon reads the accelerator back from the rotated log.
        d.kill9()
        d.start()
        with d.client() as c:
            again = c.get("chatty")
            assert again["state"] == "running" and again["accelerator"] == vm["accelerator"], again
            # The relay outlived the daemon too: the VM's lines about the new daemon's connection are logged.
            assert c.log("chatty")["text"].count("serial0: client connected") >= 1
            assert "log rotated" in logs[0].read_text(errors="replace")
            c.action("chatty", "destroy")
    finally:
        d.cleanup()
        kill_all(uuids)


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def _argv0(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""
