"""The fuzzing support itself (tests/support/fuzzing.py): budgets, counts, failures, configuration."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import strategies as st

from support import fuzzing
from support.fuzzing import FuzzConfigError, Fuzzer


def test_runs_for_the_budget_and_counts_every_execution(tmp_path: Path) -> None:
    log = tmp_path / "counts.txt"
    seen = []
    start = time.monotonic()
    result = Fuzzer(log, seconds=0.5, summary=False).run("demo", st.integers(), seen.append)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 5, elapsed
    assert result.executions == len(seen) > fuzzing.FIRST_CHUNK
    assert log.read_text() == f"fuzz: demo {result.executions} executions in {result.seconds:.1f} s\n"
    assert result not in fuzzing.RESULTS  # summary=False: not in the session's list


def test_a_zero_budget_still_runs_the_minimum(tmp_path: Path) -> None:
    seen = []
    result = Fuzzer(None, seconds=0, summary=False).run("demo-zero", st.integers(), seen.append, min_executions=30)
    assert result.executions == len(seen) >= 30


def test_a_failing_check_fails_with_the_shrunk_input() -> None:
    def check(x: int) -> None:
        assert x < 1000

    with pytest.raises(AssertionError) as exc:
        Fuzzer(None, seconds=5, summary=False).run("demo-fail", st.integers(), check)
    assert "demo-fail input: 1000" in "\n".join(getattr(exc.value, "__notes__", []))


def test_the_budget_and_seed_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fuzzing.ENV_SECONDS, "1.5")
    monkeypatch.setenv(fuzzing.ENV_SEED, "0x10")
    f = Fuzzer(summary=False)
    assert f.seconds == 1.5 and f.seed == 16
    a, b = [], []
    Fuzzer(None, seconds=0, summary=False).run("seeded-a", st.integers(), a.append)
    Fuzzer(None, seconds=0, summary=False).run("seeded-b", st.integers(), b.append)
    assert a == b  # a fixed seed replays the same inputs
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(fuzzing.ENV_SECONDS, bad)
        with pytest.raises(FuzzConfigError, match=fuzzing.ENV_SECONDS):
            Fuzzer(summary=False)
    monkeypatch.setenv(fuzzing.ENV_SECONDS, "1")
    monkeypatch.setenv(fuzzing.ENV_SEED, "x")
    with pytest.raises(FuzzConfigError, match=fuzzing.ENV_SEED):
        Fuzzer(summary=False)
