"""Turns for the vCPUs of an SMP tcg machine: one engine executes guest code at a time.

Each vCPU is its own unicorn engine, and unicorn emulates ``lock``-prefixed
instructions without host atomics, so two engines running at once could lose
each other's atomic updates.  As QEMU's single-threaded ("round-robin") TCG
does, the vCPUs therefore take turns: a vCPU holds the turn while it is inside
``emu_start`` and hands it over, first come first served, when it leaves
(hlt, a kick, pause).  A vCPU that has waited a whole time slice kicks the one
holding the turn, so a guest spinning on a lock that a waiting CPU holds does
not stall the others; sooner than that, a vCPU that executes ``pause`` (a spin
loop) while others wait gives its turn up (``on_waiting`` tells the compiled
helper how many wait).  Halted vCPUs do not hold the turn.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

#: How long a runnable vCPU waits before it takes the turn from the running one.
TIME_SLICE_S = 0.002


class Kickable(Protocol):
    def kick(self) -> None: ...


class Turns:
    """A fair lock over guest execution with time slices (see the module docstring)."""

    def __init__(self, time_slice: float = TIME_SLICE_S, on_waiting: Callable[[int], None] | None = None) -> None:
        self.time_slice = time_slice
        self._on_waiting = on_waiting
        self._cond = threading.Condition()
        self._owner: Kickable | None = None
        self._waiting: deque[Kickable] = deque()
        self.handovers = 0
        self.preemptions = 0

    def acquire(self, vcpu: Kickable) -> None:
        with self._cond:
            if self._owner is None and not self._waiting:
                self._owner = vcpu
                return
            self._waiting.append(vcpu)
            self._waiting_changed()
            while self._owner is not vcpu:
                if not self._cond.wait(self.time_slice) and self._waiting and self._waiting[0] is vcpu:
                    owner = self._owner
                    if owner is not None:       # its slice is over: leave emu_start at a block boundary
                        self.preemptions += 1
                        owner.kick()

    def release(self, vcpu: Kickable) -> None:
        with self._cond:
            if self._owner is not vcpu:
                return
            if self._waiting:
                self._owner = self._waiting.popleft()
                self._waiting_changed()
                self.handovers += 1
                self._cond.notify_all()
            else:
                self._owner = None

    def _waiting_changed(self) -> None:
        if self._on_waiting is not None:
            self._on_waiting(len(self._waiting))
