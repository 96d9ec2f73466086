"""QMP asynchronous events and QEMU's shutdown/reset causes.

An event is ``{"event": NAME, "data": {...}, "timestamp": {"seconds": S,
"microseconds": US}}`` (wall-clock time of emission; events without data
carry no ``data`` member, as in QEMU).  SHUTDOWN and RESET say who asked
(``guest``) and why (``reason``, one of QEMU's ``ShutdownCause`` names); the
machine's request reasons are free text, so :func:`cause_of` maps them.
GUEST_PANICKED and GUEST_CRASHLOADED carry the ``action`` that follows the
guest's report (``pause``, ``poweroff`` or ``run``), as QEMU's do; a pvpanic
report has no ``info``.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from pyvmm.runstate import GuestPanic, RunState


class Event(enum.StrEnum):
    SHUTDOWN = "SHUTDOWN"
    POWERDOWN = "POWERDOWN"
    RESET = "RESET"
    STOP = "STOP"
    RESUME = "RESUME"
    GUEST_PANICKED = "GUEST_PANICKED"
    GUEST_CRASHLOADED = "GUEST_CRASHLOADED"
    MIGRATION = "MIGRATION"
    MIGRATION_PASS = "MIGRATION_PASS"


class ShutdownCause(enum.StrEnum):
    """QEMU's ``ShutdownCause``; the ``host-*`` ones come from the management side."""

    NONE = "none"
    HOST_ERROR = "host-error"
    HOST_QMP_QUIT = "host-qmp-quit"
    HOST_QMP_SYSTEM_RESET = "host-qmp-system-reset"
    HOST_SIGNAL = "host-signal"
    HOST_UI = "host-ui"
    GUEST_SHUTDOWN = "guest-shutdown"
    GUEST_RESET = "guest-reset"
    GUEST_PANIC = "guest-panic"
    SUBSYSTEM_RESET = "subsystem-reset"

    @property
    def guest(self) -> bool:
        return self in (ShutdownCause.GUEST_SHUTDOWN, ShutdownCause.GUEST_RESET, ShutdownCause.GUEST_PANIC)


_CAUSES = {c.value: c for c in ShutdownCause}


def cause_of(reason: str, default: ShutdownCause) -> ShutdownCause:
    """The QEMU cause for a machine request reason.

    The monitor posts its own requests with the QEMU cause name as reason
    (e.g. ``host-qmp-quit``); anything else came from the guest side (a
    device, a triple fault, isa-debug-exit) and gets ``default``.
    """
    return _CAUSES.get(reason, default)


def timestamp(now: float | None = None) -> dict[str, int]:
    t = time.time() if now is None else now
    seconds = int(t)
    return {"seconds": seconds, "microseconds": int((t - seconds) * 1_000_000)}


def make_event(name: Event, data: dict[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"event": str(name)}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = timestamp(now)
    return msg


def shutdown_event(cause: ShutdownCause) -> dict[str, Any]:
    return make_event(Event.SHUTDOWN, {"guest": cause.guest, "reason": str(cause)})


def reset_event(cause: ShutdownCause) -> dict[str, Any]:
    return make_event(Event.RESET, {"guest": cause.guest, "reason": str(cause)})


def guest_panic_event(report: GuestPanic) -> dict[str, Any]:
    name = Event.GUEST_CRASHLOADED if report.crashloaded else Event.GUEST_PANICKED
    return make_event(name, {"action": report.action})


class StateTracker:
    """Turns the machine's run-state changes into the events QEMU sends for them.

    ``RUNNING`` after ``PAUSED``/``PRELAUNCH`` is RESUME, ``PAUSED`` and
    ``GUEST_PANICKED`` (a panic with ``-action panic=pause``) are STOP,
    ``SHUTDOWN`` is SHUTDOWN with the mapped cause, ``INTERNAL_ERROR`` is a
    STOP (QEMU stops the VM; pyvmm then exits, reported as a host-error
    SHUTDOWN).  A ``RUNNING -> RUNNING`` notification (the machine coming back
    from a reset) produces nothing; resets have their own notification.
    """

    def __init__(self) -> None:
        self.last = RunState.PRELAUNCH

    def events_for(self, state: RunState, reason: str) -> list[dict[str, Any]]:
        prev, self.last = self.last, state
        if state is RunState.RUNNING:
            return [make_event(Event.RESUME)] if prev is not RunState.RUNNING else []
        if state in (RunState.PAUSED, RunState.GUEST_PANICKED, RunState.FINISH_MIGRATE):
            stopped = (RunState.PAUSED, RunState.GUEST_PANICKED, RunState.FINISH_MIGRATE, RunState.POSTMIGRATE)
            return [make_event(Event.STOP)] if prev not in stopped else []
        if state is RunState.SHUTDOWN:
            if prev is RunState.SHUTDOWN:
                return []
            return [shutdown_event(cause_of(reason, ShutdownCause.GUEST_SHUTDOWN))]
        if state is RunState.INTERNAL_ERROR:
            return [make_event(Event.STOP), shutdown_event(ShutdownCause.HOST_ERROR)]
        return []
