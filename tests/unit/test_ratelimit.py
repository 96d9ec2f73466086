"""The shared limit on guest-triggered log lines (pyvmm.ratelimit)."""

from __future__ import annotations

import logging

from pyvmm.ratelimit import GUEST_LOG, RateLimiter, guest_log


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_one_line_per_interval_with_the_suppressed_count():
    clock = Clock()
    rl = RateLimiter(burst=3, interval=5.0, clock=clock)
    assert [rl.take()[0] for _ in range(5)] == [True, True, True, False, False]
    clock.now += 4.9
    assert rl.take() == (False, 0)
    clock.now += 0.2
    assert rl.take() == (True, 3)  # three lines were dropped since the last one
    assert rl.take() == (False, 0)
    clock.now += 3600  # a long quiet spell refills the burst, no more
    assert [rl.take()[0] for _ in range(4)] == [True, True, True, False]


def test_guest_log_shares_one_budget_across_loggers(caplog):
    GUEST_LOG.reset()
    a, b = logging.getLogger("pyvmm.test.a"), logging.getLogger("pyvmm.test.b")
    with caplog.at_level(logging.INFO, logger="pyvmm.test"):
        for i in range(1000):
            guest_log(a if i % 2 else b, logging.WARNING, "flood %d", i)
    assert len(caplog.records) == GUEST_LOG.burst
    assert {r.name for r in caplog.records} == {"pyvmm.test.a", "pyvmm.test.b"}
    GUEST_LOG.reset()


def test_lines_below_the_log_level_do_not_spend_the_budget(caplog):
    GUEST_LOG.reset()
    quiet = logging.getLogger("pyvmm.test.quiet")
    with caplog.at_level(logging.WARNING, logger="pyvmm.test"):
        for _ in range(100):
            assert not guest_log(quiet, logging.DEBUG, "not shown")
        assert guest_log(quiet, logging.WARNING, "shown")
    assert [r.getMessage() for r in caplog.records] == ["shown"]
    GUEST_LOG.reset()
