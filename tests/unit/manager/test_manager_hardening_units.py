"""The manager's hardening pieces without a daemon: body cap, capped log, VM lock, full-disk errors, strict models."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from pyvmm.manager import vmlock
from pyvmm.manager.diskfull import is_out_of_space, status_and_message
from pyvmm.manager.limits import BodyLimit
from pyvmm.manager.logcap import CappedLog
from pyvmm.manager.models import VmDefinitionIn


def _call(headers, chunks):
    """Drive an ASGI app with one HTTP request; returns (messages sent, bytes the app received)."""
    sent: list[dict] = []
    got = bytearray()
    pending = list(chunks)

    async def receive():
        if not pending:
            return {"type": "http.request", "body": b"", "more_body": False}
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    async def inner(scope, recv, snd):
        while True:
            m = await recv()
            if m["type"] == "http.disconnect":
                await snd({"type": "http.response.start", "status": 400, "headers": []})
                await snd({"type": "http.response.body", "body": b"too late"})
                return
            got.extend(m.get("body", b""))
            if not m.get("more_body"):
                break
        await snd({"type": "http.response.start", "status": 200, "headers": []})
        await snd({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "method": "POST", "path": "/api/v1/vms", "headers": headers}
    asyncio.run(BodyLimit(inner, limit=1000)(scope, receive, send))
    return sent, bytes(got)


def test_body_limit_refuses_a_declared_length_without_reading():
    sent, got = _call([(b"content-length", b"100000000")], [b"x" * 1000] * 5)
    assert sent[0]["status"] == 413 and b"too large" in sent[1]["body"]
    assert got == b"" and len(sent) == 2


def test_body_limit_stops_a_chunked_body_past_the_limit_and_drops_the_apps_answer():
    sent, got = _call([], [b"x" * 600, b"x" * 600, b"x" * 600])
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [413]
    assert len(got) == 600  # the chunk that passed the limit never reached the application


def test_body_limit_passes_small_bodies():
    sent, got = _call([(b"content-length", b"900")], [b"x" * 900])
    assert sent[0]["status"] == 200 and got == b"x" * 900


def test_capped_log_rotates_and_keeps_the_head(tmp_path: Path):
    path = tmp_path / "vm.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    log = CappedLog(str(path), fd, max_bytes=64 << 10, head_bytes=1024)
    log.write(b"pyvmm: accelerator: kvm (/dev/kvm)\n")
    for i in range(20000):
        log.write(b"flood line %d\n" % i)
    os.close(log.fd)
    assert path.stat().st_size <= 64 << 10
    assert (tmp_path / "vm.log.1").stat().st_size <= 64 << 10
    text = path.read_bytes()
    assert text.startswith(b"pyvmm: accelerator: kvm (/dev/kvm)\n")
    assert b"log rotated" in text and text.endswith(b"flood line 19999\n")
    assert not list(tmp_path.glob("vm.log.2"))


def test_capped_log_drops_on_a_full_disk_and_says_so(tmp_path: Path):
    r, w = os.pipe()
    log = CappedLog(str(tmp_path / "vm.log"), w, max_bytes=1 << 20)
    os.close(r)  # writes now fail with EPIPE, which is not a full disk: raised
    with pytest.raises(BrokenPipeError):
        log.write(b"x\n")
    full = CappedLog(str(tmp_path / "full.log"), os.open("/dev/full", os.O_WRONLY), max_bytes=1 << 20)
    full.write(b"lost line\n")
    assert full.dropped == len(b"lost line\n")


def test_logcap_relay_ends_with_its_input(tmp_path: Path):
    fd = os.open(tmp_path / "vm.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    p = subprocess.run([sys.executable, "-m", "pyvmm.manager.logcap", "vm.log", "--max-bytes", "20000"],
                       input=b"hello\n" + b"y" * 50000, stdout=fd, cwd=tmp_path, timeout=30)
    os.close(fd)
    assert p.returncode == 0
    assert (tmp_path / "vm.log").read_bytes().startswith(b"hello\n")
    assert (tmp_path / "vm.log").stat().st_size <= 20000


def test_vm_lock_is_held_by_the_process_it_was_given_to(tmp_path: Path):
    fd = vmlock.try_lock(tmp_path)
    assert fd is not None
    assert vmlock.try_lock(tmp_path) is None  # flock: a second open file description is refused
    tag = "0f0e0d0c-0000-4000-8000-000000000001"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", tag], pass_fds=(fd,))
    os.close(fd)
    try:
        # Popen returns once exec has begun; the kernel sets the new command line a little later
        deadline = time.monotonic() + 10
        while tag.encode() not in Path(f"/proc/{child.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vmlock.is_held(tmp_path)
        assert vmlock.holders(tmp_path, tag) == [child.pid]
        assert vmlock.holders(tmp_path, "another-uuid") == []
    finally:
        child.kill()
        child.wait()
    assert not vmlock.is_held(tmp_path)


def test_out_of_space_errors_are_507_and_others_500():
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    db = sqlite3.connect(":memory:")
    full = sqlite3.OperationalError("database or disk is full")
    assert is_out_of_space(full)
    db.close()
    status, message = status_and_message(OSError(errno.ENOSPC, "x", "/var/lib/pyvmm/run"), "cannot start")
    assert status == 507 and "disk is full" in message and "/var/lib/pyvmm/run" in message
    assert status_and_message(OSError(errno.EIO, "x"), "cannot start")[0] == 500


@pytest.mark.parametrize("field,value", [("vcpus", "2"), ("vcpus", True), ("vcpus", 2.0), ("memory_mib", float("inf")),
                                         ("memory_mib", float("nan")), ("autostart", 1), ("autostart", "true")])
def test_definition_fields_are_not_coerced(field, value):
    with pytest.raises(ValidationError):
        VmDefinitionIn.model_validate({"name": "a", field: value})
    assert VmDefinitionIn.model_validate({"name": "a", "vcpus": 2, "memory_mib": 64, "autostart": True}).vcpus == 2
