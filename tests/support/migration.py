"""Running a stock Linux guest under pyvmm or QEMU for the save/restore and migration tests.

:class:`Vm` starts one VMM process with the same QEMU options for both kinds (serial and QMP
on unix sockets), and offers the serial console (:class:`SocketConsole`) and a synchronous
QMP client (qemu.qmp's ``QEMUMonitorProtocol``).  :data:`WORKLOAD` is the guest's side: a
counter printed on the console every 0.2 s and appended to a tmpfs file.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

from support.guestconsole import SocketConsole

READY = "pyvmm-guest: shell ready"
TICK_RE = re.compile(r"tick-(\d+)\r?\n")
WORKLOAD = ("mkdir -p /t && mount -t tmpfs tmpfs /t && "
            "(i=0; while :; do i=$((i+1)); echo tick-$i; echo $i >> /t/log; sleep 0.2; done) &\n")


def qemu_binary() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "guests" / "qmp"))
    from harness import ensure_qemu

    return str(ensure_qemu())


class Vm:
    def __init__(self, kind: str, workdir: Path, name: str, args: Sequence[str], *,
                 netns: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> None:
        self.kind = kind
        self.serial_path = workdir / f"{name}-serial.sock"
        self.qmp_path = workdir / f"{name}-qmp.sock"
        self.log = workdir / f"{name}-stderr.txt"
        common = ["-serial", f"unix:{self.serial_path},server=on,wait=off",
                  "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *args]
        if kind == "pyvmm":
            cmd = [sys.executable, "-m", "pyvmm", "run", "-accel", "tcg", *common]
        else:
            cmd = [qemu_binary(), "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config", *common]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen([*netns, *cmd], stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                         pass_fds=tuple(pass_fds))
        deadline = time.monotonic() + 60
        while not (self.serial_path.exists() and self.qmp_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{kind} did not start: {self.stderr()}")
            time.sleep(0.05)
        self.console = SocketConsole(self.serial_path, name=f"{kind} {name} console")
        while True:  # the socket file exists once bound; it accepts once listening
            self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                self.qmp.connect()
                break
            except (ConnectError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{kind}: no QMP: {self.stderr()}") from None
                time.sleep(0.05)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def cmd(self, name: str, **args: Any) -> Any:
        reply = self.qmp.cmd_raw(name, args or None)
        if "error" in reply:
            raise AssertionError(f"{self.kind}: {name} failed: {reply['error']}")
        return reply["return"]

    def error_of(self, name: str, **args: Any) -> str:
        reply = self.qmp.cmd_raw(name, args or None)
        assert "error" in reply, f"{self.kind}: {name} did not fail: {reply}"
        return str(reply["error"]["desc"])

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def wait_status(self, want: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (have := self.status()) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.kind}: status {have}, waited for {want}\n{self.stderr()}")
            time.sleep(0.05)

    def wait_migration(self, timeout: float = 120, until: Sequence[str] = ("completed", "failed",
                                                                            "cancelled")) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in until:
                return dict(info)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.kind}: migration still {info}\n{self.stderr()}")
            time.sleep(0.05)

    def ticks(self) -> list[int]:
        return [int(m) for m in TICK_RE.findall(self.console.text)]

    def wait_tick(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(t >= n for t in self.ticks()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{self.kind}: no tick-{n}; console tail:\n{self.console.text[-1500:]}\n"
                                     f"stderr:\n{self.stderr()}")
            time.sleep(0.05)

    def ask(self, command: str, marker: str, timeout: float = 60) -> str:
        """Run ``command`` in the guest shell; it must print ``MARKER=value``; returns value."""
        start = len(self.console.text)
        self.console.send(command + "\n")
        pattern = re.compile(re.escape(marker) + r"=([^\r\n]*)\r?\n")
        deadline = time.monotonic() + timeout
        while True:
            for m in pattern.finditer(self.console.text, start):
                if not m.group(1).startswith("$"):  # not the echo of the command line itself
                    return m.group(1)
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{self.kind}: no {marker}= after {command!r}; console tail:\n"
                                     f"{self.console.text[-1500:]}\nstderr:\n{self.stderr()}")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:
            pass
        self.console.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
