"""Save, restore and incoming migration under ``-sandbox on`` (docs/sandbox.md).

The sandbox forbids new sockets and listeners, so ``-incoming unix:``/``exec:`` open their
channel before the filter goes in, and the source under the sandbox saves to descriptors it
is given with ``getfd`` (a file for a save, a connected socket for a migration), as libvirt
does.  Each step runs on pyvmm and on qemu-system-x86_64 with the same options; pyvmm's
answer to ``migrate unix:`` under the sandbox (a clear refusal, the VM goes on) is its own, as
QEMU's seccomp filter allows sockets.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from support.migration import READY, WORKLOAD, Vm


def _pass_fd(vm: Vm, name: str, fd: int) -> None:
    vm.qmp.send_fd_scm(fd)
    vm.cmd("getfd", fdname=name)


def _check_guest(vm: Vm, last: int) -> None:
    vm.wait_tick(last + 2)
    assert vm.ask("echo SHELL=$((6*7))", "SHELL") == "42"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_save_restore_and_incoming_unix_under_the_sandbox(kind: str, linux, tmp_path: Path) -> None:
    args = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256",
            "-sandbox", "on"]
    state = tmp_path / "vm.state"
    vms: list[Vm] = []
    try:
        src = Vm(kind, tmp_path, "src", args)
        vms.append(src)
        src.console.wait_for(READY, 300)
        src.console.send(WORKLOAD)
        src.wait_tick(3)
        if kind == "pyvmm":  # a new socket would be SIGSYS: refused, and the guest goes on
            assert "-sandbox on forbids new sockets" in src.error_of("migrate", uri=f"unix:{tmp_path}/x.sock")
            assert src.status() == "running"
        # save: the state goes to a file the VMM could not open itself
        src.cmd("stop")
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _pass_fd(src, "save", fd)
        finally:
            os.close(fd)
        src.cmd("migrate", uri="fd:save")
        assert src.wait_migration()["status"] == "completed"
        last = max(src.ticks())
        src.close()

        # restore under the sandbox from exec: (the reader starts before the filter)
        restored = Vm(kind, tmp_path, "restored", [*args, "-incoming", f"exec:cat {state}"])
        vms.append(restored)
        restored.wait_status("paused", 120)
        restored.cmd("cont")
        _check_guest(restored, last)

        # live migration to a destination listening on -incoming unix: under the sandbox, over a
        # socket the source (sandboxed too) is handed connected
        sock_path = tmp_path / "mig.sock"
        dst = Vm(kind, tmp_path, "dst", [*args, "-incoming", f"unix:{sock_path}"])
        vms.append(dst)
        assert dst.status() == "inmigrate"
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 30
        while True:
            try:
                conn.connect(str(sock_path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{kind}: -incoming unix: is not listening\n{dst.stderr()}") from None
                time.sleep(0.05)
        try:
            _pass_fd(restored, "out", conn.fileno())
        finally:
            conn.close()
        restored.cmd("migrate", uri="fd:out")
        assert restored.wait_migration()["status"] == "completed"
        last = max(restored.ticks())
        dst.wait_status("running", 120)
        _check_guest(dst, last)
        assert dst.proc.poll() is None
    except AssertionError as e:
        raise AssertionError(f"{e}\n" + "\n".join(f"{v.log.name}:\n{v.stderr()}" for v in vms)) from None
    finally:
        for v in vms:
            v.close()
