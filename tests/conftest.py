"""Shared fixtures: the purpose-built test guests, and running ``pyvmm`` / QEMU on them.

Guests are compiled once per test session into a temporary directory with the
system gcc/binutils (see tests/support/guests/build.py).  A missing toolchain, a
missing /dev/kvm or a missing QEMU is a test failure with a clear message,
never a skip: these tests exist to catch exactly such breakage.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.fuzzing import LOG_NAME, FuzzConfigError, Fuzzer, terminal_summary
from support.vmms import qemu_binary


def _load_guest_build():
    """Import tests/support/guests/build.py under a unique name (``build`` is also a PyPI package)."""
    path = Path(__file__).resolve().parent / "support" / "guests" / "build.py"
    spec = importlib.util.spec_from_file_location("pyvmm_test_guest_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


guest_build = _load_guest_build()

#: Exit value of a guest whose seven checks all passed.
ALL_CHECKS = 0x7F

#: Size of the initrd / multiboot module the guests verify byte by byte.
INITRD_SIZE = 4219


def initrd_bytes(size: int = INITRD_SIZE) -> bytes:
    """The pattern the guests check: byte i = (i * 7 + 3) & 0xff."""
    return bytes((i * 7 + 3) & 0xFF for i in range(size))


def guest_checksum(data: bytes) -> int:
    """The checksum the guests print for a module/initrd: sum = sum * 31 + byte (mod 2**32)."""
    s = 0
    for b in data:
        s = (s * 31 + b) & 0xFFFFFFFF
    return s


def debug_exit_status(value: int) -> int:
    """Process exit status for an isa-debug-exit write of ``value``."""
    return ((value << 1) | 1) & 0xFF


@dataclass
class RunResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def serial(self) -> str:
        """Guest serial output with CR/LF normalised."""
        return self.stdout.replace("\r\n", "\n").replace("\r", "")

    def describe(self) -> str:
        return (f"command: {' '.join(self.args)}\nstatus: {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")


class Guests:
    """Lazily builds guests into one session directory; ``guests["smp"]`` -> Path."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir

    def __getitem__(self, name: str) -> Path:
        try:
            return guest_build.build_guest(name, self.outdir)
        except guest_build.ToolchainError as exc:
            pytest.fail(f"building test guest {name!r} failed: {exc}", pytrace=False)


@pytest.fixture(autouse=True)
def _guest_log_budget() -> Iterator[None]:
    """Each test starts with the full budget of guest-triggered log lines (pyvmm.ratelimit)."""
    from pyvmm.ratelimit import GUEST_LOG

    GUEST_LOG.reset()
    yield


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Guests:
    try:
        guest_build.check_toolchain()
    except guest_build.ToolchainError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Guests(tmp_path_factory.mktemp("guests"))


@pytest.fixture(scope="session")
def initrd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("initrd") / "initrd.bin"
    path.write_bytes(initrd_bytes())
    return path


@pytest.fixture(scope="module")
def linux():
    """The guest kit's default guest with a quiet kernel (a test file may define its own ``linux``)."""
    from pyvmm.guestkit import default_guest

    return default_guest().with_cmdline("quiet")


@pytest.fixture(scope="session")
def kvm() -> None:
    """Require a usable /dev/kvm (fail, do not skip)."""
    if not os.path.exists("/dev/kvm"):
        pytest.fail("/dev/kvm does not exist: these tests need KVM", pytrace=False)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.fail("/dev/kvm is not readable and writable by this user", pytrace=False)


def run_pyvmm(*args: str | os.PathLike, input: bytes | None = None, timeout: float = 60,
              subcommand: str = "run") -> RunResult:
    """Run ``python -m pyvmm run ARGS``; stdin is /dev/null unless ``input`` is given.

    With ``PYVMM_TEST_SANDBOX=1`` in the environment every ``run`` gets ``-sandbox on`` first: a
    whole test file then runs its guests under the seccomp sandbox.
    """
    sandbox = ["-sandbox", "on"] if subcommand == "run" and os.environ.get("PYVMM_TEST_SANDBOX") == "1" else []
    cmd = [sys.executable, "-m", "pyvmm", subcommand, *sandbox, *map(str, args)]
    try:
        proc = subprocess.run(cmd, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        err = (exc.stderr or b"").decode(errors="replace")
        pytest.fail(f"pyvmm did not finish within {timeout}s\ncommand: {' '.join(cmd)}\n"
                    f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}", pytrace=False)
    return RunResult(cmd, proc.returncode, proc.stdout.decode(errors="replace"),
                     proc.stderr.decode(errors="replace"))


def run_pyvmm_kvm(*args: str | os.PathLike, **kw) -> RunResult:
    """pyvmm on KVM with an isa-debug-exit device, as every guest test wants."""
    return run_pyvmm("--accel", "kvm", "--device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *args, **kw)


@contextlib.contextmanager
def pyvmm_process(*args: str | os.PathLike) -> Iterator[subprocess.Popen]:
    """``python -m pyvmm run ARGS`` in the background (stdout/stderr piped), killed on exit."""
    sandbox = ["-sandbox", "on"] if os.environ.get("PYVMM_TEST_SANDBOX") == "1" else []
    cmd = [sys.executable, "-m", "pyvmm", "run", *sandbox, *map(str, args)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def reported(serial: str, name: str) -> str:
    """Value of a ``name=value`` line in the guest's serial summary."""
    m = re.search(rf"^{re.escape(name)}=(.*)$", serial, re.M)
    assert m, f"guest did not report {name!r}:\n{serial}"
    return m.group(1)


def assert_one_error_line(r: RunResult, *needles: str) -> None:
    """Non-zero status, no traceback, one stderr line with "error", naming every needle."""
    assert r.returncode != 0, r.describe()
    assert "Traceback" not in r.stderr, r.describe()
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, r.describe()
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not named in: {errors[0]}"


def run_qemu(*args: str | os.PathLike, timeout: float = 60,
             send_after: tuple[bytes, bytes] | None = None) -> RunResult:
    """Run QEMU with TCG, serial on stdout and isa-debug-exit.

    ``send_after=(prompt, data)`` writes ``data`` to the guest's UART once
    ``prompt`` appeared on its output (QEMU's firmware would otherwise see it first).
    """
    cmd = [qemu_binary(), "-accel", "tcg", "-nographic", "-display", "none", "-monitor", "none",
           "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *map(str, args)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    try:
        if send_after is not None:
            prompt, data = send_after
            deadline = time.monotonic() + timeout
            while prompt not in out:
                if time.monotonic() > deadline or proc.poll() is not None:
                    break
                chunk = proc.stdout.read1(4096)
                if not chunk:
                    break
                out += chunk
            proc.stdin.write(data)
            proc.stdin.flush()
        rest, err = proc.communicate(timeout=timeout)  # closes stdin: EOF for the guest UART
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, err = proc.communicate()
        pytest.fail(f"QEMU did not finish within {timeout}s\ncommand: {' '.join(cmd)}\n"
                    f"{(out + rest).decode(errors='replace')[-4000:]}", pytrace=False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return RunResult(cmd, proc.returncode, (out + rest).decode(errors="replace"), err.decode(errors="replace"))


@pytest.fixture(scope="session")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Fuzzer:
    """Runs time-bounded fuzz targets (tests/support/fuzzing.py; budget: $PYVMM_FUZZ_SECONDS)."""
    try:
        return Fuzzer(tmp_path_factory.getbasetemp() / LOG_NAME)
    except FuzzConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


def pytest_terminal_summary(terminalreporter) -> None:
    """CI output lists the fuzz executions per target (``fuzz: TARGET N executions``)."""
    terminal_summary(terminalreporter)
