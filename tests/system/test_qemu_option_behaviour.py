"""What the QEMU options pyvmm honours do, checked against qemu-system-x86_64 on the same guest.

The option table (test_qemu_option_grammar.py) checks that both VMMs accept the same
spellings; this file checks that the accepted options then behave the same: -S waits for
'cont', -rtc base= sets the guest's clock, -no-acpi removes the tables, -nodefaults removes the
serial port, -pidfile and -daemonize, -name/-uuid on QMP, -machine none.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.guestconsole import connect_unix
from support.vmms import vmm_command

DEBUG_EXIT = "isa-debug-exit,iobase=0xf4,iosize=0x04"
#: No display and no default devices: every test starts both VMMs so.
HEADLESS = ("-display", "none", "-nodefaults")
#: No guest at all.
NO_MACHINE = ("-machine", "none", *HEADLESS)


def _vmm(kind: str) -> list[str]:
    return [*vmm_command(kind), "-accel", "tcg"]


def _guest(kernel: Path) -> tuple[str, ...]:
    """``kernel`` booted with 64 MiB, after HEADLESS."""
    return (*HEADLESS, "-kernel", str(kernel), "-m", "64")


def _qmp_server(sock: Path) -> tuple[str, str]:
    return ("-qmp", f"unix:{sock},server=on,wait=off")


@pytest.fixture
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qbeh-", dir="/tmp"))  # short: unix socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Qmp:
    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.sock = connect_unix(path, timeout)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rwb")
        assert "QMP" in json.loads(self.f.readline())
        self.execute("qmp_capabilities")

    def execute(self, cmd: str) -> dict:
        self.f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError(f"QMP closed before answering {cmd}")
            msg = json.loads(line)
            if "return" in msg or "error" in msg:
                return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
            self.sock.close()


def _run(kind: str, *args: str, cwd: Path, timeout: float = 90, env: dict | None = None):
    r = subprocess.run([*_vmm(kind), *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout, env=env)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


@contextlib.contextmanager
def _serving(kind: str, *args: str, sock: Path, cwd: Path, stderr: int = subprocess.DEVNULL
             ) -> Iterator[tuple[subprocess.Popen, Qmp]]:
    """``kind`` running ``args`` with QMP on ``sock`` (appended), and a client connected to it;
    the process is killed on the way out if it still runs."""
    proc = subprocess.Popen([*_vmm(kind), *args, *_qmp_server(sock)], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        qmp = Qmp(sock)
        try:
            yield proc, qmp
        finally:
            qmp.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _quit(proc: subprocess.Popen, qmp: Qmp) -> None:
    """'quit' over QMP: the VMM exits with status 0."""
    qmp.execute("quit")
    qmp.close()
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_S_waits_for_cont(guests, work, kind):  # noqa: N802 - the option is -S
    serial, sock = work / "serial.txt", work / "qmp.sock"
    with _serving(kind, "-S", *_guest(guests["multiboot_info"]), "-serial", f"file:{serial}", "-device", DEBUG_EXIT,
                  sock=sock, cwd=work, stderr=subprocess.PIPE) as (proc, qmp):
        assert qmp.execute("query-status")["return"]["status"] == "prelaunch"
        time.sleep(1.0)
        assert proc.poll() is None and not (serial.exists() and serial.read_text()), "the guest ran before 'cont'"
        assert qmp.execute("cont") == {"return": {}}
        rc = proc.wait(timeout=60)
        assert rc > 1 and rc & 1, (rc, proc.stderr.read() if proc.stderr else "")  # left by isa-debug-exit
        assert "rtc=" in serial.read_text()


def _boot(kind: str, kernel: Path, *args: str, cwd: Path, env: dict | None = None):
    """_run with ``kernel`` booted (see _guest) and ``args``."""
    return _run(kind, *_guest(kernel), *args, cwd=cwd, env=env)


def _rtc(kind: str, guests, work: Path, *args: str, env: dict | None = None) -> str:
    serial = work / f"{kind}-serial.txt"
    rc, _out, err = _boot(kind, guests["multiboot_info"], "-serial", f"file:{serial}", "-device", DEBUG_EXIT, *args,
                          cwd=work, env=env)
    assert rc > 1 and rc & 1, (rc, err)  # left through isa-debug-exit
    m = re.search(r"^rtc=(\d{4}-\d\d-\d\d \d\d:\d\d):\d\d$", serial.read_text(), re.M)
    assert m, serial.read_text()
    return m.group(1)


def test_rtc_base_date_sets_the_guest_clock(guests, work):
    got = {kind: _rtc(kind, guests, work, "-rtc", "base=2006-06-17T16:01:21") for kind in ("pyvmm", "qemu")}
    assert got["pyvmm"] == got["qemu"] == "2006-06-17 16:01", got


def test_rtc_base_localtime_follows_tz(guests, work):
    env = {**os.environ, "TZ": "XYZ-5:30"}  # POSIX TZ, UTC+5:30: needs no tz database
    local = {kind: _rtc(kind, guests, work, "-rtc", "base=localtime", env=env) for kind in ("pyvmm", "qemu")}
    utc = {kind: _rtc(kind, guests, work, "-rtc", "base=utc", env=env) for kind in ("pyvmm", "qemu")}

    def minutes(t: str) -> int:
        h, m = t.split()[1].split(":")
        return int(h) * 60 + int(m)

    for kind in ("pyvmm", "qemu"):
        assert (minutes(local[kind]) - minutes(utc[kind])) % 1440 in (330, 331), (kind, local, utc)
    assert abs(minutes(local["pyvmm"]) - minutes(local["qemu"])) % 1440 <= 1, local


def test_no_acpi_removes_the_tables(guests, work):
    for kind in ("pyvmm", "qemu"):
        rc, out, err = _boot(kind, guests["acpi"], "-serial", "stdio", "-device", DEBUG_EXIT, "-no-acpi", cwd=work)
        assert "no RSDP" in out and rc == 1, (kind, rc, out, err)
        rc, out, err = _boot(kind, guests["acpi"], "-serial", "stdio", "-device", DEBUG_EXIT, cwd=work)
        assert "rsdp=" in out and "no RSDP" not in out, (kind, rc, out, err)


def test_nodefaults_means_no_serial_output(guests, work):
    results = {}
    for kind in ("pyvmm", "qemu"):
        rc, out, err = _boot(kind, guests["multiboot_info"], "-device", DEBUG_EXIT, cwd=work)
        results[kind] = (rc, out)
        assert out == "", (kind, out, err)
    assert results["pyvmm"][0] == results["qemu"][0], results


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_pidfile_holds_the_pid_while_running(work, kind):
    sock, pidfile = work / "qmp.sock", work / "vmm.pid"
    with _serving(kind, *NO_MACHINE, "-pidfile", str(pidfile), sock=sock, cwd=work) as (proc, qmp):
        assert int(pidfile.read_text()) == proc.pid
        # a second VMM with the same pid file is refused while the first runs
        rc, _out, err = _run(kind, *NO_MACHINE, "-pidfile", str(pidfile), cwd=work, timeout=30)
        assert rc == 1 and err.strip(), err
        _quit(proc, qmp)


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_daemonize_detaches_once_set_up(guests, work, kind):
    sock, pidfile = work / "qmp.sock", work / "vmm.pid"
    t0 = time.monotonic()
    rc, out, err = _run(kind, "-daemonize", "-S", *HEADLESS, "-pidfile", str(pidfile),
                        "-kernel", str(guests["multiboot_info"]), "-m", "64", *_qmp_server(sock), cwd=work, timeout=60)
    assert rc == 0 and out == "", (rc, out, err)
    assert time.monotonic() - t0 < 30
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, 0)  # the daemon runs on, in its own session
        assert os.getsid(pid) == pid or os.getsid(pid) != os.getsid(0)
        qmp = Qmp(sock)
        assert qmp.execute("query-status")["return"]["status"] == "prelaunch"
        with contextlib.suppress(ConnectionError, OSError):
            qmp.execute("quit")
        qmp.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the daemon did not quit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def test_daemonize_refuses_stdio():
    r = subprocess.run([*vmm_command("pyvmm"), "-daemonize", "-serial", "stdio", "-machine", "none"],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stderr.startswith("pyvmm: error: -daemonize") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_machine_none_name_and_uuid_on_qmp(work, kind):
    with _serving(kind, *NO_MACHINE, "-name", "guest=vm1", "-uuid", "12345678-ABCD-1234-1234-123456789abc",
                  sock=work / "qmp.sock", cwd=work) as (proc, qmp):
        assert qmp.execute("query-status")["return"]["status"] == "running"
        assert qmp.execute("query-name")["return"] == {"name": "vm1"}
        assert qmp.execute("query-uuid")["return"] == {"UUID": "12345678-abcd-1234-1234-123456789abc"}
        assert qmp.execute("stop") == {"return": {}}
        assert qmp.execute("query-status")["return"]["status"] == "paused"
        _quit(proc, qmp)


@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_no_name_or_uuid_on_qmp(work, kind):
    with _serving(kind, *NO_MACHINE, sock=work / "qmp.sock", cwd=work) as (proc, qmp):
        assert qmp.execute("query-name")["return"] == {}
        assert qmp.execute("query-uuid")["return"] == {"UUID": "00000000-0000-0000-0000-000000000000"}
        _quit(proc, qmp)
