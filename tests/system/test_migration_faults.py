"""Issue 13's fault cases, with QEMU running the same commands where it behaves the same way.

* The destination dies mid-stream: the source keeps running and ``query-migrate`` says
  ``failed`` (pyvmm and QEMU).
* ``migrate_cancel``: the source keeps running, the status is ``cancelled`` (pyvmm and QEMU).
* A truncated, corrupt or version-mismatched stream, or one for another machine
  configuration: the loader refuses it with one line and exits non-zero.  (QEMU refuses a
  truncated stream too; it has no checksums, so a corrupt page would load silently.)
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.migration import READY, WORKLOAD, Vm


def _args(linux, memory: str = "256") -> list[str]:
    return ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", memory]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running_guest(kind: str, linux, tmp_path: Path, name: str = "src") -> Vm:
    vm = Vm(kind, tmp_path, name, _args(linux))
    vm.console.wait_for(READY, 300)
    vm.console.send(WORKLOAD)
    vm.wait_tick(3)
    return vm


def _keeps_running(vm: Vm) -> None:
    assert vm.status() == "running"
    now = max(vm.ticks())
    vm.wait_tick(now + 3, timeout=30)
    assert vm.ask("echo SHELL=$((6*7))", "SHELL") == "42"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_destination_dies_mid_stream(kind: str, linux, tmp_path: Path) -> None:
    port = _free_port()
    src = _running_guest(kind, linux, tmp_path)
    dst = Vm(kind, tmp_path, "dst", [*_args(linux), "-incoming", f"tcp:127.0.0.1:{port}"])
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})  # a few seconds of stream
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while src.cmd("query-migrate").get("ram", {}).get("transferred", 0) < (2 << 20):
            assert time.monotonic() < deadline, src.cmd("query-migrate")
            time.sleep(0.05)
        dst.proc.kill()
        info = src.wait_migration()
        assert info["status"] == "failed", info
        _keeps_running(src)
    finally:
        dst.close()
        src.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_migrate_cancel_leaves_the_source_running(kind: str, linux, tmp_path: Path) -> None:
    src = _running_guest(kind, linux, tmp_path)
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
        src.cmd("migrate", uri="exec:cat > /dev/null")
        src.wait_migration(until=("active",), timeout=30)
        time.sleep(0.5)
        src.cmd("migrate_cancel")
        info = src.wait_migration()
        assert info["status"] == "cancelled", info
        _keeps_running(src)
    finally:
        src.close()


# -- refused streams (pyvmm) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(linux, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("saved")
    state = d / "vm.state"
    vm = _running_guest("pyvmm", linux, d)
    try:
        vm.cmd("stop")
        vm.cmd("migrate", uri=f"exec:cat > {state}")
        assert vm.wait_migration()["status"] == "completed"
    finally:
        vm.close()
    return state


def _restore(linux, tmp_path: Path, stream: Path, memory: str = "256") -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pyvmm", "run", "-accel", "tcg", "-serial", "none", *_args(linux, memory),
           "-incoming", f"exec:cat {stream}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("pyvmm: accelerator:")]
    return p.returncode, "\n".join(lines)


def _one_line(rc: int, err: str, *words: str) -> None:
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


@pytest.mark.slow
def test_truncated_stream_is_refused(linux, saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated"
    data = saved.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    _one_line(*_restore(linux, tmp_path, bad), "load of migration failed", "truncated")


@pytest.mark.slow
def test_corrupt_stream_is_refused(linux, saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt"
    data = bytearray(saved.read_bytes())
    data[len(data) // 3] ^= 0x55
    bad.write_bytes(bytes(data))
    _one_line(*_restore(linux, tmp_path, bad), "load of migration failed", "corrupt")


@pytest.mark.slow
def test_newer_stream_format_is_refused(linux, saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "v99"
    data = bytearray(saved.read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    _one_line(*_restore(linux, tmp_path, bad), "format version 99 is not supported")


@pytest.mark.slow
def test_newer_section_version_and_unknown_section_are_refused(linux, saved: Path, tmp_path: Path) -> None:
    from pyvmm.vmstate import stream as vs

    def rewrite(out: Path, change) -> None:
        with open(saved, "rb") as f, open(out, "wb") as g:
            r, w = vs.StreamReader(f), vs.StreamWriter(g)
            while True:
                kind, payload = r.record()
                if kind == vs.SECTION:
                    ident, driver, version, state = vs.parse_section(payload)
                    ident, driver, version = change(ident, driver, version)
                    w.section(ident, driver, version, state)
                else:
                    w.record(kind, payload)
                if kind == vs.END:
                    return

    newer = tmp_path / "newer"
    rewrite(newer, lambda i, d, v: (i, d, 99 if d == "mc146818rtc" else v))
    _one_line(*_restore(linux, tmp_path, newer), "mc146818rtc", "version 99")
    unknown = tmp_path / "unknown"
    rewrite(unknown, lambda i, d, v: ("/machine/peripheral/ghost" if d == "mc146818rtc" else i, d, v))
    _one_line(*_restore(linux, tmp_path, unknown), "/machine/peripheral/ghost", "does not have")


@pytest.mark.slow
def test_stream_for_another_configuration_is_refused(linux, saved: Path, tmp_path: Path) -> None:
    _one_line(*_restore(linux, tmp_path, saved, memory="512"), "another machine configuration", "ram")
