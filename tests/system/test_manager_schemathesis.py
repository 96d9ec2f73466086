"""API fuzzing: schemathesis, run against pyvmmd's OpenAPI document, finds no 5xx (and no other failures).

The daemon listens on TCP 127.0.0.1 with a token, exactly as in production.
One VM with a real kernel is defined first, so the fuzzer's life-cycle calls
(start, suspend, destroy, ...) also reach a real VM.  Every schemathesis check
runs except ``positive_data_acceptance``: whether a definition is acceptable
also depends on files existing on the host (the kernel), which no schema can
say, so schema-valid definitions naming missing files rightly get 400.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from test_manager_support import Daemon, free_port, guest_definition, manager_guest  # noqa: F401


def _schemathesis() -> list[str]:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(exe).exists():
        raise AssertionError("schemathesis is not installed: pip install -e .[test]")
    return [exe]


def test_schemathesis_finds_no_server_errors(tmp_path, manager_guest):  # noqa: F811
    d = Daemon(tmp_path / "state", tcp_port=free_port())
    d.start()
    try:
        with d.client() as c:
            c.define(guest_definition("fz", manager_guest))
        cmd = [*_schemathesis(), "run", f"{d.url}/openapi.json", "-H", f"Authorization: Bearer {d.token}",
               "--max-examples", "6", "--seed", "2", "--request-timeout", "30",
               "--exclude-checks", "positive_data_acceptance", "--no-color"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        (tmp_path / "schemathesis.txt").write_text(out)
        assert proc.returncode == 0, f"schemathesis found failures:\n{out[-6000:]}\n--- daemon log:\n{d.log_text()}"
        assert " passed" in out and "Server error" not in out
        # The daemon is still healthy after the fuzzing (which may well have undefined "fz").
        assert d.proc.poll() is None
        with d.client() as c:
            assert isinstance(c.list(), list)
            assert "pyvmmd" in c.request("GET", "/version")
    finally:
        d.cleanup()
