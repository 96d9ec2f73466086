"""VM life-cycle requests.

vCPU threads and devices never tear the machine down themselves: they post a
request here (reset, power-off, exit with a status, guest panic, fatal error),
and the machine's main thread acts on it.  This keeps all teardown on one thread.

A guest panic (pvpanic) follows QEMU's ``-action panic=``, held here as QEMU
keeps it next to its run state: the report is told at once to the
:attr:`VmControl.panic_listeners` (the QMP ``GUEST_PANICKED`` event, with the
action taken), then, unless the action is ``none``, a :attr:`RequestKind.PANIC`
request asks the main thread to pause or shut the machine down.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass


class RunState(enum.Enum):
    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"
    GUEST_PANICKED = "guest-panicked"
    INMIGRATE = "inmigrate"            # -incoming: waiting for (or reading) a migration stream
    FINISH_MIGRATE = "finish-migrate"  # the source's last pass: vCPUs stopped, state being sent
    POSTMIGRATE = "postmigrate"        # the source after a completed migration (QMP 'cont' runs it again)


class RequestKind(enum.Enum):
    RESET = "reset"
    POWEROFF = "poweroff"
    EXIT = "exit"           # isa-debug-exit: leave with a given status
    ERROR = "error"         # emulation failure / internal error: stop cleanly, non-zero status
    PANIC = "panic"         # the guest panicked: pause or shut down, as the panic action says


class PanicAction(enum.Enum):
    """QEMU's ``-action panic=`` (default ``shutdown``)."""

    PAUSE = "pause"
    SHUTDOWN = "shutdown"
    EXIT_FAILURE = "exit-failure"  # shut down, and the process exits with status 1
    NONE = "none"

    @property
    def reported(self) -> str:
        """The ``action`` QEMU puts in GUEST_PANICKED: ``pause``, ``poweroff`` or ``run``."""
        return {"pause": "pause", "shutdown": "poweroff", "exit-failure": "poweroff"}.get(self.value, "run")


@dataclass(frozen=True)
class GuestPanic:
    """What a panic listener is told: the guest panicked (or loaded a crash kernel), and what follows."""

    action: str  # GuestPanicAction: "pause", "poweroff" or "run"
    crashloaded: bool = False


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
        self.panic_action = PanicAction.SHUTDOWN
        #: Called (from the reporting device's thread, must not block) at each guest panic report.
        self.panic_listeners: list[Callable[[GuestPanic], None]] = []

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

    def guest_panicked(self, reason: str) -> None:
        """A device reports a guest panic; the machine reacts as :attr:`panic_action` says."""
        action = self.panic_action
        self._tell(GuestPanic(action.reported))
        if action is not PanicAction.NONE:
            self.post(Request(RequestKind.PANIC, reason, 1 if action is PanicAction.EXIT_FAILURE else 0))

    def guest_crashloaded(self, reason: str) -> None:
        """A device reports that the guest panicked into a crash kernel: told, but the VM runs on."""
        self._tell(GuestPanic("run", crashloaded=True))

    def _tell(self, report: GuestPanic) -> None:
        for cb in list(self.panic_listeners):
            cb(report)

    def wait(self, timeout: float | None = None) -> Request | None:
        """Block until a request is posted (or ``timeout``); returns the oldest, or None."""
        with self._cond:
            if not self.queue:
                self._cond.wait(timeout)
            return self.queue.pop(0) if self.queue else None

    def take_guest_requests(self) -> list[Request]:
        """Remove and return the queued requests that came from the guest side (not ``host-*`` reasons)."""
        with self._cond:
            taken = [r for r in self.queue if not r.reason.startswith("host-")]
            self.queue[:] = [r for r in self.queue if r.reason.startswith("host-")]
            return taken

    def pending(self) -> bool:
        with self._cond:
            return bool(self.queue)
