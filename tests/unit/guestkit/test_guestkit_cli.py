"""``python -m pyvmm.guestkit``: the preparation entry point used by CI and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm.guestkit", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def test_json_output_points_at_real_images() -> None:
    proc = _run("--json", "-q", "--append", "tsc_early_khz=1000000")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["kernel"]).is_file() and Path(out["initrd"]).is_file()
    assert out["cmdline"] == "console=ttyS0 panic=-1 tsc_early_khz=1000000"
    assert "virtio_blk" in out["modules"]
    assert out["kernel_info"]["release"] in out["initrd"]


def test_shell_output() -> None:
    proc = _run("-q")
    assert proc.returncode == 0, proc.stderr
    keys = [line.split("=", 1)[0] for line in proc.stdout.splitlines()]
    assert keys == ["KERNEL", "INITRD", "CMDLINE"]


def test_error_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {**os.environ, "PYVMM_CACHE_DIR": str(blocker / "cache")}
    proc = _run("-q", env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm.guestkit: error: cannot create cache directory"), proc.stderr
