"""``mapped-ram`` saves to a descriptor passed over QMP, under ``-sandbox on``.

A sandboxed VMM may open no file for writing, so the client opens the state file and passes it:
``add-fd`` and ``migrate file:/dev/fdset/N`` (QEMU's spelling), or ``getfd`` and ``migrate fd:NAME``
naming a regular file.  Both are written with ``pwrite`` at the mapped-ram offsets, truncated first
(holes must not show old bytes), and each restores with ``-incoming file:PATH`` under the sandbox:
the guest continues and its shell answers.  A socket passed for mapped-ram, a read-only fd set and
``file:PATH`` itself are refused, and the guest is unharmed.  QEMU 9 has mapped-ram; the QEMU here
(7.2) does not, so there is no QEMU run (as in test_migration_instant.py).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from support.migration import READY, WORKLOAD, Vm


def _seccomp(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:"))


@pytest.mark.slow
def test_mapped_ram_to_passed_descriptors_under_the_sandbox(linux, tmp_path: Path) -> None:
    args = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256",
            "-sandbox", "on"]
    by_fdset, by_name = tmp_path / "fdset.state", tmp_path / "named.state"
    src = Vm("pyvmm", tmp_path, "src", args)
    try:
        src.console.wait_for(READY, 300)
        assert _seccomp(src.proc.pid) == "2"
        src.console.send(WORKLOAD)
        src.wait_tick(3)
        src.cmd("stop")
        time.sleep(0.3)
        last = max(src.ticks())
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "mapped-ram", "state": True}])

        # the VMM cannot create the file itself: the migration fails, the VMM lives
        src.cmd("migrate", uri=f"file:{tmp_path / 'own.state'}")
        info = src.wait_migration()
        assert info["status"] == "failed" and "Permission denied" in info.get("error-desc", ""), info
        assert not (tmp_path / "own.state").exists() and src.status() == "paused"

        # a socket is not seekable, a read-only fd set has nothing to write to: refused at once
        a, b = socket.socketpair()
        try:
            src.qmp.send_fd_scm(a.fileno())
            src.cmd("getfd", fdname="sock")
        finally:
            a.close()
            b.close()
        assert "requires a seekable file" in src.error_of("migrate", uri="fd:sock")
        ro = os.open(linux.kernel, os.O_RDONLY)
        try:
            src.qmp.send_fd_scm(ro)
            ro_set = src.cmd("add-fd")["fdset-id"]
        finally:
            os.close(ro)
        assert "no writable descriptor" in src.error_of("migrate", uri=f"file:/dev/fdset/{ro_set}")
        src.cmd("remove-fd", **{"fdset-id": ro_set})
        assert src.status() == "paused"

        # add-fd + file:/dev/fdset/N, into a file full of old bytes (truncated first)
        by_fdset.write_bytes(b"\xee" * (8 << 20))
        fd = os.open(by_fdset, os.O_WRONLY)
        try:
            src.qmp.send_fd_scm(fd)
            added = src.cmd("add-fd", opaque="state")
        finally:
            os.close(fd)
        src.cmd("migrate", uri=f"file:/dev/fdset/{added['fdset-id']}")
        info = src.wait_migration()
        assert info["status"] == "completed", info
        src.cmd("remove-fd", **{"fdset-id": added["fdset-id"]})
        assert b"\xee" * 4096 not in by_fdset.read_bytes()

        # getfd + fd:NAME naming a regular file
        fd = os.open(by_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            src.qmp.send_fd_scm(fd)
            src.cmd("getfd", fdname="state")
        finally:
            os.close(fd)
        src.cmd("migrate", uri="fd:state")
        info = src.wait_migration()
        assert info["status"] == "completed", info
        assert info["ram"]["normal-bytes"] > 0, info
        # the migration took (and closed) the named descriptor
        assert "not found" in src.error_of("closefd", fdname="state")
        held = [os.readlink(f) for f in Path(f"/proc/{src.proc.pid}/fd").iterdir()]
        assert str(by_name) not in held and str(by_fdset) not in held, held
    finally:
        src.close()

    for i, state in enumerate((by_fdset, by_name)):
        vm = Vm("pyvmm", tmp_path, f"restored{i}", [*args, "-incoming", f"file:{state}"])
        try:
            vm.wait_status("paused", 60)
            assert _seccomp(vm.proc.pid) == "2"
            vm.cmd("cont")
            vm.wait_tick(last + 2)
            assert min(vm.ticks()) <= last + 1
            assert vm.ask(f"echo R{i}=$((40+{i}))", f"R{i}") == str(40 + i)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{vm.stderr()}") from None
        finally:
            vm.close()
