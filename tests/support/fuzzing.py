"""Time-bounded fuzzing on hypothesis, with the number of executions counted per target.

A fuzz *target* is a strategy (what hostile input looks like) and a check (feed one input to the
parser and assert its invariants).  :meth:`Fuzzer.run` drives the check with hypothesis for a
wall-clock budget instead of a fixed number of examples: it runs hypothesis in chunks, sizing each
chunk from the rate measured so far, until the budget is spent.  A failing input is shrunk by
hypothesis as usual and the test fails with the minimal example (and the seed to replay it).

The budget is ``$PYVMM_FUZZ_SECONDS`` seconds per target (default :data:`DEFAULT_SECONDS`; the
Makefile sets it for ``make test`` and ``make test-fast``).  ``$PYVMM_FUZZ_SEED`` fixes the seeds,
so a run can be repeated exactly; without it every run explores new inputs.

Each finished target appends ``fuzz: TARGET N executions in S s`` to ``fuzz-executions.txt`` in
pytest's base temporary directory, and the same lines are printed in pytest's terminal summary
(:func:`terminal_summary`, called from tests/conftest.py), so CI output shows them.
"""

from __future__ import annotations

import os
import reprlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

T = TypeVar("T")

ENV_SECONDS = "PYVMM_FUZZ_SECONDS"
ENV_SEED = "PYVMM_FUZZ_SEED"
#: Seconds per target when $PYVMM_FUZZ_SECONDS is not set (a plain ``pytest`` run).
DEFAULT_SECONDS = 2.0
#: Examples in the first chunk of a run (the rate measured on it sizes the next chunks).
FIRST_CHUNK = 25
MAX_CHUNK = 20_000
#: Longest a chunk is planned to take (hypothesis cannot be stopped inside one).
CHUNK_SECONDS = 1.5
LOG_NAME = "fuzz-executions.txt"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxlist, _REPR.maxdict = 8, 40, 40, 40
_REPR.maxstring, _REPR.maxother = 300, 300
_REPR.maxlong = 100


class FuzzConfigError(ValueError):
    """$PYVMM_FUZZ_SECONDS or $PYVMM_FUZZ_SEED is not a number."""


def budget_seconds() -> float:
    text = os.environ.get(ENV_SECONDS, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise FuzzConfigError(f"${ENV_SECONDS}={text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise FuzzConfigError(f"${ENV_SECONDS}={text!r} must be a finite number >= 0")
    return value


def fixed_seed() -> int | None:
    text = os.environ.get(ENV_SEED, "").strip()
    if not text:
        return None
    try:
        return int(text, 0)
    except ValueError:
        raise FuzzConfigError(f"${ENV_SEED}={text!r} is not an integer") from None


@dataclass
class FuzzResult:
    target: str
    executions: int
    seconds: float
    chunks: int

    def line(self) -> str:
        return f"fuzz: {self.target} {self.executions} executions in {self.seconds:.1f} s"


#: Every target run in this session, in order (read by :func:`terminal_summary`).
RESULTS: list[FuzzResult] = []
#: Where this session's counts are appended (set by the first Fuzzer with a log path).
LOG_PATHS: list[Path] = []


class Fuzzer:
    """Runs fuzz targets for the session's budget; one per session (the ``fuzz`` fixture)."""

    def __init__(self, log_path: Path | None = None, seconds: float | None = None, *, summary: bool = True) -> None:
        """``summary=False``: the runs are not listed in the session's terminal summary."""
        self.log_path = log_path
        self.summary = summary
        if summary and log_path is not None and log_path not in LOG_PATHS:
            LOG_PATHS.append(log_path)
        self.seconds = budget_seconds() if seconds is None else seconds
        self.seed = fixed_seed()

    def run(self, target: str, strategy: st.SearchStrategy[T], check: Callable[[T], Any], *,
            weight: float = 1.0, min_executions: int = FIRST_CHUNK) -> FuzzResult:
        """Call ``check`` on inputs drawn from ``strategy`` for ``weight`` times the budget.

        At least ``min_executions`` inputs are tried whatever the budget (so a budget of 0 still
        runs every target a little).  Raises whatever hypothesis raises for a failing input.
        """
        budget = self.seconds * weight
        executions = 0

        def body(value: T) -> None:
            nonlocal executions
            executions += 1
            try:
                check(value)
            except BaseException:
                hypothesis.note(f"{target} input: {_REPR.repr(value)}")
                raise

        start = time.monotonic()
        deadline = start + budget
        chunk, chunks = max(1, min(FIRST_CHUNK, min_executions)), 0
        try:
            while True:
                chunk_start, before = time.monotonic(), executions
                test = settings(max_examples=chunk, deadline=None, database=None, derandomize=False,
                                suppress_health_check=list(HealthCheck),
                                phases=(Phase.generate, Phase.target, Phase.shrink))(given(strategy)(body))
                if self.seed is not None:
                    test = hypothesis.seed(self.seed + chunks)(test)
                test()
                chunks += 1
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0 and executions >= min_executions:
                    break
                rate = (executions - before) / max(now - chunk_start, 1e-3)
                # Chunks of at most CHUNK_SECONDS, and 80 % of what is left: the rate varies with
                # the inputs, so the last chunk overruns the budget by a fraction of a chunk at most.
                chunk = int(min(MAX_CHUNK, max(10, rate * min(max(remaining, 0) * 0.8, CHUNK_SECONDS),
                                               min_executions - executions)))
        finally:
            result = FuzzResult(target, executions, time.monotonic() - start, chunks)
            if self.summary:
                RESULTS.append(result)
            if self.log_path is not None:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(result.line() + "\n")
        return result


def terminal_summary(terminalreporter: Any) -> None:
    """Print one ``fuzz: TARGET N executions`` line per target run in this session."""
    if not RESULTS:
        return
    terminalreporter.section("fuzz executions")
    for r in RESULTS:
        terminalreporter.write_line(r.line())
    total = sum(r.executions for r in RESULTS)
    budget = os.environ.get(ENV_SECONDS) or f"{DEFAULT_SECONDS:g}"
    terminalreporter.write_line(f"fuzz: {len(RESULTS)} targets, {total} executions in "
                                f"{sum(r.seconds for r in RESULTS):.1f} s "
                                f"(budget {budget} s per target, ${ENV_SECONDS})")
    for path in LOG_PATHS:
        terminalreporter.write_line(f"fuzz: counts also in {path}")
