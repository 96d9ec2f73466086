"""One shared rate limit for log lines a guest can cause.

A guest decides how often it resets a device, corrupts a ring, refuses
features or resets the machine; each of those logs a line.  Left alone, a
guest in a loop writes the VMM's log (and the manager's ``vm.log``) without
limit.  Every guest-triggered log line therefore goes through
:func:`guest_log`, which consults one process-wide token bucket
(:data:`GUEST_LOG`): a burst of :data:`BURST` lines, then one line per
:data:`INTERVAL` seconds.  Lines over the limit are counted, and the next
line that is let through says how many were suppressed, so nothing is lost
silently.  One bucket for all devices means the log's growth is bounded
however many devices the guest drives at once.

Threading: :class:`RateLimiter` takes its own lock; callable from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

#: Lines allowed in a burst before the limit applies.
BURST = 10
#: Seconds per line once the burst is spent.
INTERVAL = 5.0


class RateLimiter:
    """A token bucket: ``burst`` tokens, refilled at one per ``interval`` seconds."""

    def __init__(self, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._stamp = clock()
        self._suppressed = 0

    def take(self) -> tuple[bool, int]:
        """(allowed, lines suppressed since the last allowed one); counts a refusal."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) / self.interval)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                suppressed, self._suppressed = self._suppressed, 0
                return True, suppressed
            self._suppressed += 1
            return False, 0

    def reset(self) -> None:
        """Full bucket, nothing suppressed (tests)."""
        with self._lock:
            self._tokens = float(self.burst)
            self._stamp = self._clock()
            self._suppressed = 0


#: The limiter every guest-triggered log line shares.
GUEST_LOG = RateLimiter()


def guest_log(logger: logging.Logger, level: int, msg: str, *args: object) -> bool:
    """Log ``msg % args`` at ``level`` unless the guest-triggered line budget is spent.

    Returns whether the line was written.  A line is only counted against the budget when
    ``logger`` would emit it at all.
    """
    if not logger.isEnabledFor(level):
        return False
    allowed, suppressed = GUEST_LOG.take()
    if not allowed:
        return False
    if suppressed:
        logger.log(level, msg + " (%d more guest-triggered messages were suppressed)", *args, suppressed)
    else:
        logger.log(level, msg, *args)
    return True
