"""VM life-cycle requests.

vCPU threads and devices never tear the machine down themselves: they post a
request here (reset, power-off, exit with a status, fatal error), and the
machine's main thread acts on it.  This keeps all teardown on one thread.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass


class RunState(enum.Enum):
    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"


class RequestKind(enum.Enum):
    RESET = "reset"
    POWEROFF = "poweroff"
    EXIT = "exit"           # isa-debug-exit: leave with a given status
    ERROR = "error"         # emulation failure / internal error: stop cleanly, non-zero status


@dataclass(frozen=True)
class Request:
    kind: RequestKind
    reason: str
    status: int = 0


class VmControl:
    """A mailbox of life-cycle requests, safe to post from any thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        #: Pending requests, oldest first.  vCPU loops may test its truthiness without the lock after
        #: a device access (a cheap "did a device just ask for something?"); only post/wait change it.
        self.queue: list[Request] = []
        self.state = RunState.PRELAUNCH

    def post(self, request: Request) -> None:
        with self._cond:
            self.queue.append(request)
            self._cond.notify_all()

    def request_reset(self, reason: str) -> None:
        self.post(Request(RequestKind.RESET, reason))

    def request_poweroff(self, reason: str) -> None:
        self.post(Request(RequestKind.POWEROFF, reason))

    def request_exit(self, status: int, reason: str) -> None:
        self.post(Request(RequestKind.EXIT, reason, status))

    def request_error(self, reason: str, status: int = 1) -> None:
        self.post(Request(RequestKind.ERROR, reason, status))

    def wait(self, timeout: float | None = None) -> Request | None:
        """Block until a request is posted (or ``timeout``); returns the oldest, or None."""
        with self._cond:
            if not self.queue:
                self._cond.wait(timeout)
            return self.queue.pop(0) if self.queue else None

    def pending(self) -> bool:
        with self._cond:
            return bool(self.queue)
