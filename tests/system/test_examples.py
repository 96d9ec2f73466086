"""Every script in examples/ runs to success, as a user would run it (so `make test` runs them all)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"sandbox.py", "ci_run.py", "custom_device.py", "exit_tracer.py"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script.name} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
