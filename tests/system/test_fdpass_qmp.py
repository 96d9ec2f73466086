"""Descriptors passed over QMP (``getfd``, ``closefd``, ``add-fd``, ``remove-fd``, ``query-fdsets``)
behave as QEMU's, and ``migrate fd:NAME`` saves a running Linux guest to a descriptor passed
with ``getfd`` (libvirt's ``virsh save``); the state restores with ``-incoming fd:N``.

The same commands go to pyvmm and to qemu-system-x86_64, with the descriptors sent as
``SCM_RIGHTS`` by qemu.qmp's ``send_fd_scm``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.migration import READY, WORKLOAD, Vm


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_getfd_and_migrate_to_a_passed_fd(kind: str, linux, tmp_path: Path) -> None:
    args = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256"]
    state = tmp_path / "vm.state"
    src = Vm(kind, tmp_path, "src", args)
    try:
        assert src.error_of("getfd", fdname="x") == "No file descriptor supplied via SCM_RIGHTS"
        r, w = os.pipe()
        try:
            src.qmp.send_fd_scm(r)
            assert src.error_of("getfd", fdname="1x") == "Parameter 'fdname' expects a name not starting with a digit"
            src.qmp.send_fd_scm(r)
            src.cmd("getfd", fdname="x")
            src.qmp.send_fd_scm(w)
            src.cmd("getfd", fdname="x")          # the same name again replaces the first one
            src.cmd("closefd", fdname="x")
            assert src.error_of("closefd", fdname="x") == "File descriptor named 'x' not found"
            assert src.error_of("add-fd") == "No file descriptor supplied via SCM_RIGHTS"
            src.qmp.send_fd_scm(r)
            added = src.cmd("add-fd", opaque="hello")
            assert added["fdset-id"] == 0 and isinstance(added["fd"], int)
            assert src.cmd("query-fdsets") == [{"fdset-id": 0, "fds": [{"fd": added["fd"], "opaque": "hello"}]}]
            assert src.error_of("remove-fd", **{"fdset-id": 5}) == "File descriptor named 'fdset-id:5' not found"
            assert (src.error_of("remove-fd", **{"fdset-id": 0, "fd": added["fd"] + 100})
                    == f"File descriptor named 'fdset-id:0, fd:{added['fd'] + 100}' not found")
            src.cmd("remove-fd", **{"fdset-id": 0})
            assert "File descriptor named 'nosuch' has not been found" in src.error_of("migrate", uri="fd:nosuch")
        finally:
            os.close(r)
            os.close(w)

        src.console.wait_for(READY, 300)
        src.console.send(WORKLOAD)
        src.wait_tick(3)
        src.cmd("stop")
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            src.qmp.send_fd_scm(fd)
        finally:
            os.close(fd)                           # the VMM holds its own copy now
        src.cmd("getfd", fdname="migrate")
        src.cmd("migrate", uri="fd:migrate")
        assert src.wait_migration()["status"] == "completed"
        assert src.error_of("closefd", fdname="migrate") == "File descriptor named 'migrate' not found"
        last = max(src.ticks())
    except AssertionError as e:
        raise AssertionError(f"{e}\nstderr:\n{src.stderr()}") from None
    finally:
        src.close()
    assert state.stat().st_size > 1 << 20
    fd = os.open(state, os.O_RDONLY)
    try:
        dst = Vm(kind, tmp_path, "dst", [*args, "-incoming", f"fd:{fd}"], pass_fds=[fd])
    finally:
        os.close(fd)
    try:
        dst.wait_status("paused", 120)
        dst.cmd("cont")
        dst.wait_tick(last + 2)
        assert dst.ask("echo SHELL=$((6*7))", "SHELL") == "42"
    finally:
        dst.close()
