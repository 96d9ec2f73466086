"""The public API, used exactly as a user would (issue 14's acceptance script).

A VM with the default guest (the guest kit's kernel, accelerator auto); ``exec`` of
``uname -r`` and of ``sh -c "echo out; echo err >&2; exit 7"`` (status 7, separate streams);
a 1 MiB file written and read back byte for byte; a shared folder (virtio-fs, Debian's
virtiofsd) read and written from both sides; a clean stop.  Then what users hit next:
a timeout that kills the command, QMP, pause/resume, events, and resources released on
every path (a failing start leaves no process and no directory behind).
"""

from __future__ import annotations

import os
import platform
import time

import pytest

pytestmark = pytest.mark.slow


def test_the_issue_acceptance_script(tmp_path) -> None:
    from pyvmm import VM

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from_host.txt").write_text("written on the host\n")
    with VM(memory="512M", cpus=2, shares=[f"{shared}:work"]) as vm:
        r = vm.exec(["uname", "-r"], timeout=120)
        assert r.returncode == 0 and r.stdout.decode().strip().startswith("6.") and r.stderr == b""

        r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=120)
        assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")

        data = os.urandom(1 << 20)
        vm.write_file("/tmp/in.bin", data)
        assert vm.exec(["sha256sum", "/tmp/in.bin"]).stdout.split()[0].decode() == \
            __import__("hashlib").sha256(data).hexdigest()
        assert vm.read_file("/tmp/in.bin") == data

        assert vm.exec(["cat", "/mnt/work/from_host.txt"]).stdout == b"written on the host\n"
        assert vm.exec(["sh", "-c", "echo written in the guest > /mnt/work/from_guest.txt"]).returncode == 0
        assert (shared / "from_guest.txt").read_text() == "written in the guest\n"
        (shared / "later.txt").write_text("after the mount\n")
        assert vm.exec(["cat", "/mnt/work/later.txt"]).stdout == b"after the mount\n"

        assert vm.qmp("query-status")["status"] == "running"
        vm.pause()
        assert vm.qmp("query-status")["status"] == "paused"
        assert vm.wait_event("STOP", timeout=10)["event"] == "STOP"
        vm.resume()
        assert vm.exec("echo back").stdout == b"back\n"
        assert vm.stop(timeout=120) == 0
        runtime_dir = vm.runtime_dir
    assert vm.returncode == 0 and not vm.running
    assert runtime_dir is not None and not runtime_dir.exists()


def test_timeouts_errors_and_cleanup() -> None:
    from pyvmm import VM, VMError, VMTimeout

    with VM(memory="256M") as vm:
        t0 = time.monotonic()
        with pytest.raises(VMTimeout):
            vm.exec(["sleep", "60"], timeout=2)
        assert time.monotonic() - t0 < 30
        assert "sleep 60" not in vm.exec(["ps"]).stdout.decode()  # it was killed
        with pytest.raises(VMError):
            vm.exec(["/no/such/program"])
        with pytest.raises(VMError):
            vm.qmp("no-such-command")
        killed = vm.exec(["sh", "-c", "kill -KILL $$"])
        assert killed.returncode == -9
        assert vm.exec(["uname", "-m"]).stdout.strip().decode() == platform.machine()
        pid = vm.pid
    assert pid is not None and not os.path.exists(f"/proc/{pid}/status") or \
        "zombie" in open(f"/proc/{pid}/status").read()

    bad = VM(kernel="/no/such/kernel")
    with pytest.raises(VMError):
        bad.start()
    assert bad.runtime_dir is not None and not bad.runtime_dir.exists() and not bad.running


def test_snapshot_and_start_from_it(tmp_path) -> None:
    from pyvmm import VM

    snap = tmp_path / "vm.snapshot"
    with VM(memory="256M") as vm:
        vm.write_file("/tmp/state.txt", b"before the snapshot\n")
        vm.snapshot(snap)
        assert vm.qmp("query-status")["status"] == "postmigrate"
        vm.resume()
        assert vm.exec(["cat", "/tmp/state.txt"]).stdout == b"before the snapshot\n"
    t0 = time.monotonic()
    with VM(memory="256M", snapshot=snap) as vm:
        ready = time.monotonic() - t0
        assert vm.read_file("/tmp/state.txt") == b"before the snapshot\n"
        assert vm.exec(["sh", "-c", "echo again; exit 5"]).returncode == 5
        assert vm.stop() == 0
    assert ready < 60
