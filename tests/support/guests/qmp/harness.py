"""Test harness for the QMP tests: build the guest, run a VMM, talk QMP.

The same test drives either VMM: ``pyvmm`` (this project) or
``qemu-system-x86_64`` (the reference).  Both boot the multiboot guest built
from ``qmp_guest.c`` with ``-kernel``, write COM1 to a file and serve QMP on
a unix socket, so a test only sees serial text, QMP replies and events, and
the process exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

SRC = Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"
#: pyvmm's accelerator for these tests (the guest is tiny, so KVM works even where ring 0 is emulated).
PYVMM_ACCEL = os.environ.get("PYVMM_QMP_ACCEL", "kvm")

CFLAGS = ["-m32", "-march=i686", "-std=gnu11", "-Os", "-Wall", "-Wextra", "-Werror", "-ffreestanding",
          "-fno-builtin", "-nostdlib", "-fno-stack-protector", "-fno-pic", "-fno-pie",
          "-fno-asynchronous-unwind-tables", "-mgeneral-regs-only"]

QMP_SOCKETS = 3
TICK_RE = re.compile(r"^tick (\d+)$", re.M)
BANNER = "QMPGUEST BOOT"


class HarnessError(RuntimeError):
    pass


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def build_guest(outdir: Path) -> Path:
    """Compile and link the guest (ELF32 multiboot kernel); returns its path."""
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise HarnessError(f"{tool} not found: install gcc and binutils to build the QMP test guest")
    outdir.mkdir(parents=True, exist_ok=True)
    c_obj, s_obj, elf = outdir / "qmp_guest.o", outdir / "entry.o", outdir / "qmp_guest.elf"
    _run(["gcc", *CFLAGS, "-c", str(SRC / "qmp_guest.c"), "-o", str(c_obj)])
    _run(["gcc", "-m32", "-c", str(SRC / "entry.S"), "-o", str(s_obj)])
    _run(["ld", "-m", "elf_i386", "-nostdlib", "--build-id=none", "-z", "noexecstack", "--no-warn-rwx-segments",
          "-T", str(SRC / "guest.ld"), "-o", str(elf), str(s_obj), str(c_obj)])
    return elf


def ensure_qemu() -> str:
    """Path of qemu-system-x86_64, installing Debian's qemu-system-x86 if it is missing."""
    path = shutil.which(QEMU)
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86"],
                       capture_output=True, env=env)
        path = shutil.which(QEMU)
    if path is None:
        raise HarnessError(f"{QEMU} is missing and could not be installed (apt-get install qemu-system-x86)")
    return path


class Vmm:
    """One VMM process running the guest, with its serial log and QMP socket."""

    def __init__(self, kind: str, kernel: Path, workdir: Path, wait_for_client: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.kind = kind
        #: Options both VMMs spell the same way, e.g. ("-append", "reset_after=3", "-no-reboot").
        self.extra_args = extra_args
        #: Leave ``wait`` at its default (on) for the first socket: the VM starts only once a client connects.
        self.wait_for_client = wait_for_client
        self.kernel = kernel
        self.workdir = workdir
        self.serial_path = workdir / f"{kind}-serial.txt"
        #: Several QMP sockets: QEMU serves one client per socket, so concurrent clients need one each.
        self.qmp_paths = [workdir / f"{kind}-qmp{i}.sock" for i in range(QMP_SOCKETS)]
        self.qmp_path = self.qmp_paths[0]
        self.log_path = workdir / f"{kind}-stderr.txt"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        if self.kind == "pyvmm":
            cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", PYVMM_ACCEL, "--kernel", str(self.kernel),
                   "-m", "64", "--serial", f"file:{self.serial_path}"]
        else:
            cmd = [ensure_qemu(), "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config",
                   "-kernel", str(self.kernel), "-m", "64", "-serial", f"file:{self.serial_path}"]
        cmd += self.extra_args
        for i, path in enumerate(self.qmp_paths):
            # pyvmm: exercise both spellings of the option (QEMU knows only -qmp).
            opts = "server=on" if i == 0 and self.wait_for_client else "server=on,wait=off"
            cmd += ["--qmp" if self.kind == "pyvmm" and i == 0 else "-qmp", f"unix:{path},{opts}"]
        return cmd

    def start(self, timeout: float = 15.0) -> None:
        for p in (self.serial_path, *self.qmp_paths):
            p.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        # With wait=on QEMU blocks on the first socket before it creates the others.
        needed = self.qmp_paths[:1] if self.wait_for_client else self.qmp_paths
        while not all(p.exists() for p in needed):
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.kind} exited with {self.proc.returncode} before serving QMP:\n"
                                   f"{self.stderr()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.kind}: no QMP socket after {timeout}s\n{self.stderr()}")
            time.sleep(0.02)

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def serial(self) -> str:
        return self.serial_path.read_text(errors="replace") if self.serial_path.exists() else ""

    def ticks(self) -> list[int]:
        return [int(m) for m in TICK_RE.findall(self.serial())]

    def boots(self) -> int:
        return self.serial().count(BANNER)

    def wait_serial(self, pred: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial()
            if pred(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.kind}: timed out after {timeout}s waiting for {what}; serial tail:\n"
                                     f"{text[-600:]}\nstderr:\n{self.stderr()[-2000:]}")
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited ({self.proc.returncode}) while waiting for {what}\n"
                                     f"{self.stderr()[-2000:]}")
            time.sleep(0.05)

    def wait_ticks(self, count: int, timeout: float = 10.0) -> list[int]:
        """Wait until ``count`` more ticks than now have been printed."""
        have = len(self.ticks())
        self.wait_serial(lambda t: len(TICK_RE.findall(t)) >= have + count, timeout, f"{count} ticks")
        return self.ticks()

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.kind} did not exit within {timeout}s\n{self.stderr()[-2000:]}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Client:
    """A ``qemu.qmp`` client (used unchanged) plus an event log."""

    def __init__(self, name: str = "test") -> None:
        self.qmp = QMPClient(name)
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None

    async def connect(self, path: Path, timeout: float = 10.0) -> None:
        """Connect, retrying while the socket file exists but nothing listens yet (a VMM binds
        the socket a moment before it listens; under load that moment is long enough to hit)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.qmp.connect(str(path))
                break
            except ConnectError as e:
                if not isinstance(e.exc, ConnectionRefusedError) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for ev in self.qmp.events:
            self.events.append(dict(ev))

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(cmd, args)

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]

    async def wait_event(self, name: str, timeout: float = 10.0, after: int = 0) -> dict[str, Any]:
        """The first event called ``name`` at position >= ``after`` in the log."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events[after:]:
                if ev["event"] == name:
                    return ev
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} event within {timeout}s (got {self.names()})")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        try:
            await self.qmp.disconnect()
        except (EOFError, ConnectionError, OSError):
            pass  # the VMM went away first (quit, power-off)
        if self._task is not None:
            self._task.cancel()


def run_async(coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
    """Run a test's async body to its end, failing it after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def connected(vm: Vmm, name: str = "test") -> AsyncIterator[Client]:
    """A ``Client`` connected to ``vm``'s first QMP socket, closed on the way out."""
    c = Client(name)
    await c.connect(vm.qmp_path)
    try:
        yield c
    finally:
        await c.close()


class RawQmp:
    """A plain socket speaking QMP by hand, for sending what no real client would."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message (one line)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no message from the VMM within the timeout")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssertionError("the VMM closed the QMP connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def try_recv(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.recv(timeout)
        except (AssertionError, TimeoutError):
            return None

    def reply_to(self, msg_id: Any, timeout: float | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Wait for the reply carrying ``msg_id``; returns it and the messages seen before it."""
        seen = []
        while True:
            msg = self.recv(timeout)
            if msg.get("id") == msg_id and ("return" in msg or "error" in msg):
                return msg, seen
            seen.append(msg)

    def execute(self, cmd: str, args: dict[str, Any] | None = None, msg_id: Any = "x") -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": cmd, "id": msg_id}
        if args is not None:
            msg["arguments"] = args
        self.send(json.dumps(msg).encode() + b"\n")
        return self.reply_to(msg_id)[0]

    def close(self) -> None:
        self.sock.close()
