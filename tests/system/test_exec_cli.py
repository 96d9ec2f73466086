"""``pyvmm exec -- CMD`` (the guest agent runs CMD; its streams and status are pyvmm's) and
``pyvmm run`` with ``pyvmm_run=`` exiting with the command's status."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow
PYVMM = [sys.executable, "-m", "pyvmm"]


def test_exec_prints_and_exits_with_the_commands_status() -> None:
    r = subprocess.run([*PYVMM, "exec", "--", "sh", "-c", "echo hi; exit 3"], capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode, r.stdout) == (3, "hi\n"), r.stderr


def test_exec_streams_stdout_and_stderr_while_the_command_runs() -> None:
    proc = subprocess.Popen([*PYVMM, "exec", "-m", "256M", "--", "sh", "-c",
                             "echo first; echo oops >&2; sleep 4; echo second; kill -TERM $$"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    seen = time.monotonic()
    out, err = proc.communicate(timeout=300)
    ended = time.monotonic()
    assert first == b"first\n" and out == b"second\n"
    assert err.decode().strip() == "oops"
    assert ended - seen > 2.5, "stdout came only at the end"
    assert proc.returncode == 128 + 15


def test_exec_usage_errors_are_one_line() -> None:
    r = subprocess.run([*PYVMM, "exec", "sh"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "usage: pyvmm exec" in r.stderr


def test_pyvmm_run_exits_with_the_pyvmm_run_status() -> None:
    from pyvmm.guestkit import default_guest

    g = default_guest()
    r = subprocess.run([*PYVMM, "run", "--accel", "tcg", "-m", "256M", "-kernel", str(g.kernel), "-initrd",
                        str(g.initrd), "-append", f'{g.cmdline} quiet pyvmm_run="echo hi; exit 3"'],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3 and "hi" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([*PYVMM, "run", "--accel", "tcg", "-m", "256M", "-kernel", str(g.kernel), "-initrd",
                        str(g.initrd), "-append", f'{g.cmdline} quiet pyvmm_run="true"'],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_exec_share_mounts_a_host_folder(tmp_path) -> None:
    (tmp_path / "in.txt").write_text("from the host\n")
    r = subprocess.run([*PYVMM, "exec", "--share", f"{tmp_path}:src", "--", "sh", "-c",
                        "cat /mnt/src/in.txt; echo from the guest > /mnt/src/out.txt"],
                       capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stdout) == (0, "from the host\n"), r.stderr
    assert (tmp_path / "out.txt").read_text() == "from the guest\n"
