"""``-sandbox on``: the seccomp allow-list of a running VMM (docs/sandbox.md).

The refusals are shown through a test-only QMP command, ``x-pyvmm-test-syscall``, that exists
only when the VMM runs with ``PYVMM_TEST_HOOKS=1``: it makes one system call the sandbox
forbids.  A forbidden call kills the process with SIGSYS (the test sees return code -31); an
open for writing fails with EACCES and the VMM goes on.  Each refusal is checked against the
same VMM without ``-sandbox on``, where the call goes through, so a hook that did nothing could
not pass.  Then a stock Linux guest (tcg) runs its whole session under the sandbox: virtio-blk,
virtio-net on passt, the serial console and QMP; and the small KVM guests run under it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ALL_CHECKS, debug_exit_status, run_pyvmm_kvm
from support.netns import USER_GATEWAY, in_ns, netns, setup_user_ns

SIGSYS_RC = -signal.SIGSYS
PYVMM = [sys.executable, "-m", "pyvmm", "run"]


class Qmp:
    """A minimal line-based QMP client for one socket."""

    def __init__(self, path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"no QMP socket (VMM status {proc.poll()})", pytrace=False)
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rw")
        assert "QMP" in json.loads(self.file.readline())
        assert self.execute("qmp_capabilities") == {"return": {}}

    def execute(self, name: str, **arguments: Any) -> dict:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                return {"closed": True}
            reply = json.loads(line)
            if "event" not in reply:
                return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def _env(hooks: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYVMM_TEST_HOOKS", None)
    if hooks:
        env["PYVMM_TEST_HOOKS"] = "1"
    return env


@contextlib.contextmanager
def vmm(tmp_path: Path, *args: str, hooks: bool = True, cmd: list[str] | None = None,
        stdout: Any = subprocess.DEVNULL) -> Iterator[tuple[subprocess.Popen, Qmp]]:
    qmp_path = tmp_path / "qmp.sock"
    full = [*(cmd or PYVMM), *args, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                            env=_env(hooks))
    qmp = None
    try:
        qmp = Qmp(qmp_path, proc)
        yield proc, qmp
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _seccomp_modes(pid: int) -> list[str]:
    """The Seccomp: field of every thread of ``pid`` (0 none, 2 filter)."""
    modes = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        m = re.search(r"^Seccomp:\s*(\d)", (task / "status").read_text(), re.M)
        assert m
        modes.append(m.group(1))
    return modes


NONE_MACHINE = ("-machine", "none", "-nodefaults")


# -- the test hook: each forbidden call, with and without the sandbox ----------------------------

@pytest.mark.parametrize("sandbox", ["on", "off"])
@pytest.mark.parametrize("call", ["execve", "listen", "ptrace"])
def test_forbidden_call_kills_the_vmm_with_sigsys(tmp_path: Path, call: str, sandbox: str) -> None:
    path = str(tmp_path / "new-listener.sock")
    with vmm(tmp_path, *NONE_MACHINE, "-sandbox", sandbox) as (proc, qmp):
        assert qmp.execute("query-status")["return"]["status"] == "running"
        modes = _seccomp_modes(proc.pid)
        assert set(modes) == ({"2"} if sandbox == "on" else {"0"}), modes  # every thread is filtered
        reply = qmp.execute("x-pyvmm-test-syscall", call=call, path=path)
        if sandbox == "on":
            assert proc.wait(10) == SIGSYS_RC, (reply, proc.stderr.read() if proc.stderr else "")
            assert not os.path.exists(path)
        elif call == "execve":  # the VMM became /bin/true, which exits 0
            assert proc.wait(10) == 0, reply
        else:
            assert "return" in reply, reply
            assert proc.poll() is None
            assert qmp.execute("query-status")["return"]["status"] == "running"
            if call == "listen":
                assert reply["return"]["result"] == "listening"


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_open_for_writing_fails_with_eacces_and_the_vmm_goes_on(tmp_path: Path, sandbox: str) -> None:
    target = tmp_path / "created-late.txt"
    with vmm(tmp_path, *NONE_MACHINE, "-sandbox", sandbox) as (proc, qmp):
        reply = qmp.execute("x-pyvmm-test-syscall", call="open-write", path=str(target))
        if sandbox == "on":
            assert reply["error"]["desc"] == f"open-write: [Errno 13] Permission denied: '{target}'", reply
            assert not target.exists()
        else:
            assert reply == {"return": {"result": "opened"}}
            assert target.exists()
        # read-only opens pass (Python's lazy imports; the kernel at a reset)
        assert qmp.execute("x-pyvmm-test-syscall", call="open-read", path="/etc/hostname") == \
            {"return": {"result": "opened"}}
        assert qmp.execute("query-status")["return"]["status"] == "running"
        assert qmp.execute("quit") == {"return": {}}
        assert proc.wait(10) == 0


def test_spawn_allow_gives_execve_back(tmp_path: Path) -> None:
    with vmm(tmp_path, *NONE_MACHINE, "-sandbox", "on,spawn=allow") as (proc, qmp):
        assert set(_seccomp_modes(proc.pid)) == {"2"}
        qmp.execute("x-pyvmm-test-syscall", call="execve")
        assert proc.wait(10) == 0  # /bin/true ran
    with vmm(tmp_path, *NONE_MACHINE, "-sandbox", "on,spawn=allow") as (proc, qmp):
        qmp.execute("x-pyvmm-test-syscall", call="ptrace")  # spawn=allow gives back spawning only
        assert proc.wait(10) == SIGSYS_RC


def test_the_hook_exists_only_with_the_test_flag(tmp_path: Path) -> None:
    with vmm(tmp_path, *NONE_MACHINE, "-sandbox", "on", hooks=False) as (proc, qmp):
        reply = qmp.execute("x-pyvmm-test-syscall", call="execve")
        assert reply["error"]["class"] == "CommandNotFound", reply
        assert qmp.execute("query-status")["return"]["status"] == "running"


# -- a Linux guest's whole session under -sandbox on ---------------------------------------------

DHCP_SCRIPT = ("printf '#!/bin/sh\\n[ $1 = bound ] || exit 0\\nip addr add $ip/$mask dev $interface\\n"
               "ip route add default via $router dev $interface\\necho dhcp-bound=$ip\\n' > /tmp/dh")


@pytest.mark.slow
def test_linux_guest_session_under_the_sandbox(tmp_path: Path) -> None:
    assert shutil.which("passt"), "passt is missing (apt-get install passt)"
    token = secrets.token_hex(8)
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text(f"net-{token}\n")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(f"old-{token}\n".encode().ljust(1 << 20, b"\0"))
    late = tmp_path / "late.txt"
    with netns("pyvmm-sbx") as ns:
        setup_user_ns(ns)
        port = 20000 + secrets.randbelow(20000)
        http = subprocess.Popen(in_ns(ns, sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                      "--directory", str(www), str(port)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            script = (f"{DHCP_SCRIPT} && chmod +x /tmp/dh && ip link set eth0 up && "
                      "udhcpc -i eth0 -n -q -t 10 -T 1 -s /tmp/dh && "
                      f"wget -q -O - http://{USER_GATEWAY}:{port}/hello.txt && "
                      f"head -c 20 /dev/vda && echo && echo new-{token} | dd of=/dev/vda conv=fsync 2>/dev/null && "
                      "echo 3 > /proc/sys/vm/drop_caches && echo readback=$(head -c 20 /dev/vda) && sleep 3")
            args = ["--accel", "tcg", "-m", "256M", "-sandbox", "on",
                    "--netdev", "user,id=u0", "--device", "virtio-net-pci,netdev=u0",
                    "--drive", f"file={disk},format=raw,if=none,id=d0", "--device", "virtio-blk-pci,drive=d0",
                    "--append", f'console=ttyS0 panic=-1 quiet pyvmm_run="{script}"']
            with vmm(tmp_path, *args, cmd=in_ns(ns, *PYVMM), stdout=subprocess.PIPE) as (proc, qmp):
                deadline = time.monotonic() + 30
                while (status := qmp.execute("query-status"))["return"]["status"] == "prelaunch":
                    assert time.monotonic() < deadline, status  # QMP serves before the kernel is loaded
                    time.sleep(0.05)
                assert status["return"]["status"] == "running", status
                modes = _seccomp_modes(proc.pid)  # `ip netns exec` execs the VMM: same pid
                assert set(modes) == {"2"} and len(modes) >= 3, modes  # vCPU, main loop, QMP... all filtered
                refused = qmp.execute("x-pyvmm-test-syscall", call="open-write", path=str(late))
                assert "Permission denied" in refused["error"]["desc"], refused
                out, err = proc.communicate(timeout=240)
                rc = proc.returncode
        finally:
            http.terminate()
            http.wait()
    serial = out.decode(errors="replace").replace("\r", "")
    desc = f"status {rc}\n--- serial ---\n{serial[-4000:]}\n--- stderr ---\n{err.decode(errors='replace')[-3000:]}"
    assert rc == 0, desc  # not -31: nothing in the session hit the filter
    assert "pyvmm-guest: exit status 0" in serial, desc
    assert re.search(r"dhcp-bound=10\.0\.2\.15", serial), desc
    assert f"net-{token}" in serial, desc  # through passt
    assert f"old-{token}" in serial and f"readback=new-{token}" in serial, desc
    assert disk.read_bytes().startswith(f"new-{token}\n".encode()), desc
    assert "powering off" in err.decode(errors="replace"), desc
    assert not late.exists()


# -- the small KVM guests under -sandbox on ------------------------------------------------------

@pytest.mark.usefixtures("kvm")
def test_kvm_guests_under_the_sandbox(guests) -> None:
    r = run_pyvmm_kvm("-sandbox", "on", "--kernel", guests["realmode_hello"])
    assert r.returncode == debug_exit_status(0x2A), r.describe()
    assert r.serial == "Hello from real mode\n", r.describe()
    # two vCPUs, a triple fault and a reset (the VM is rebuilt, the kernel read again), IPIs
    r = run_pyvmm_kvm("-sandbox", "on", "--smp", "2", "--kernel", guests["smp"], "--append", "reboot=1", timeout=90)
    assert r.returncode == debug_exit_status(0x20 | 0x10 | 0x3), r.describe()
    assert "boot=2\n" in r.serial, r.describe()
    r = run_pyvmm_kvm("-sandbox", "on", "--smp", "2", "--kernel", guests["smp"], "--append", "ipi=1", timeout=90)
    assert r.returncode == debug_exit_status(0x40 | 0x10 | 0x3), r.describe()
    r = run_pyvmm_kvm("-sandbox", "on", "--kernel", guests["fwcfg"])
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
