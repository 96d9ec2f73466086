"""The vCPU thread: a KVM_RUN loop that dispatches exits to the buses.

Kicking.  Another thread gets a vCPU out of guest mode by setting
``kvm_run.immediate_exit`` and then sending :data:`KICK_SIGNAL` to the vCPU
thread.  The flag covers the window where the thread is in userspace (its
next KVM_RUN returns EINTR at once); the signal covers a thread already in the
guest (KVM_RUN returns EINTR as soon as a signal is pending).  The signal
needs a real handler, installed without SA_RESTART by
:func:`install_kick_handler` from the main thread; an ignored signal would
not interrupt anything.  The kicker sets its request flag *before* the
``immediate_exit`` byte, and the vCPU thread clears the byte *before* reading
the flags, so no request is lost.

One loop.  Each turn runs one :class:`~pyvmm.kvm.fastrun.RunStep`, chosen when
the runner is built: the compiled helper (:mod:`pyvmm.kvm.fastrun`) or its
Python twin over the ctypes call.  Either returns the exit summarized in one
integer, with a single port access already decoded (port, size, direction,
value), so the loop body is the same for both.

Hot path.  Port I/O is what most exits are, so a single port access to an
assigned port is handled inline in the loop with everything bound to locals
and the bus lookup (``Bus.find``) inlined as a bisect.  Everything else
(string I/O, MMIO, unassigned ports, other exit reasons) goes to the exit
handlers of :mod:`pyvmm.accel.kvm_exits`, plain functions of the ``kvm_run``
contents that return an action; the runner carries the action out.

Run state.  :class:`VcpuRunState` says where the thread is; other threads
post requests (pause, resume, stop, calls) and kick, and the thread moves its
state when it acts on them.

Life-cycle requests.  When a device posts a request (reset, power-off,
exit, error) during an access, the vCPU that made the access does not
re-enter the guest: it holds until the machine stops the accelerator, as
QEMU stops the current vCPU.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import signal
import threading
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from pyvmm.accel import kvm_exits
from pyvmm.accel.kvm_exits import ExitAction, ExitContext, handle_exit
from pyvmm.bus import Bus
from pyvmm.errors import AccelError, KvmError
from pyvmm.kvm import fastrun
from pyvmm.kvm.dump import format_kvm_registers
from pyvmm.kvm.fastrun import RunCall, RunStep
from pyvmm.kvm.ioctls import ExitReason
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.runstate import VmControl

log = logging.getLogger(__name__)

#: The signal used to kick vCPU threads out of KVM_RUN (QEMU uses SIGUSR1 for the same job).
KICK_SIGNAL = signal.SIGUSR1

_PIO_DATA_OFF = fastrun.PIO_DATA_OFF
_PACK, _MASK = kvm_exits.PACK, kvm_exits.MASK
_EXIT_IO = int(ExitReason.IO)
_EXIT_MMIO = int(ExitReason.MMIO)


class VcpuRunState(enum.Enum):
    """Where a vCPU thread is, as Firecracker's vCPU state machine; only the vCPU thread moves it,
    except :meth:`VcpuRunner.start`, which moves a stopped runner to RUNNING before its thread starts.

    Requests from other threads (pause, resume, stop, calls) are flags the thread acts on when it
    leaves KVM_RUN; the state says what it did about them.
    """

    CREATED = "created"  # never run
    RUNNING = "running"  # the loop is active: in KVM_RUN or handling an exit
    PAUSED = "paused"    # parked outside KVM_RUN on a pause request, serving calls until resumed or stopped
    HELD = "held"        # parked after a device posted a life-cycle request, until the machine stops it
    STOPPED = "stopped"  # the loop has ended; start() or run() may run it again


#: The transitions :meth:`VcpuRunner._set_state` allows.
_TRANSITIONS: dict[VcpuRunState, frozenset[VcpuRunState]] = {
    VcpuRunState.CREATED: frozenset({VcpuRunState.RUNNING}),
    VcpuRunState.RUNNING: frozenset({VcpuRunState.PAUSED, VcpuRunState.HELD, VcpuRunState.STOPPED}),
    VcpuRunState.PAUSED: frozenset({VcpuRunState.RUNNING, VcpuRunState.STOPPED}),
    VcpuRunState.HELD: frozenset({VcpuRunState.RUNNING, VcpuRunState.STOPPED}),
    VcpuRunState.STOPPED: frozenset({VcpuRunState.RUNNING}),
}
_PARKED = frozenset({VcpuRunState.PAUSED, VcpuRunState.HELD})
_ACTIVE = frozenset({VcpuRunState.RUNNING, VcpuRunState.PAUSED, VcpuRunState.HELD})


def _kick_handler(signum: int, frame: object) -> None:
    """Deliberately empty: the signal exists only to make KVM_RUN return EINTR."""


def install_kick_handler() -> None:
    """Install the no-op kick handler (main thread only) with SA_RESTART off.

    From another thread Python cannot install handlers; that is fine if one
    is already installed, otherwise kicks would kill the process (SIG_DFL) or
    be lost (SIG_IGN), so it is an error.
    """
    try:
        signal.signal(KICK_SIGNAL, _kick_handler)
        signal.siginterrupt(KICK_SIGNAL, True)
    except ValueError:
        current = signal.getsignal(KICK_SIGNAL)
        if not callable(current):
            raise AccelError(f"kvm: the vCPU kick signal ({KICK_SIGNAL.name}) handler must be installed from "
                             f"the main thread; set the accelerator up from the main thread") from None


class VcpuRunner:
    """Runs one :class:`Vcpu` on its own thread and services pause/stop/call requests.

    ``halt_action`` says what a KVM_EXIT_HLT does (it only happens without an
    in-kernel irqchip): ``"idle"`` waits a little and re-enters, ``"stop"``
    ends the loop (used by tests and benchmarks).
    """

    def __init__(self, vcpu: Vcpu, io_bus: Bus, mmio_bus: Bus, control: VmControl,
                 halt_action: str = "idle", run_call: RunCall | None = None) -> None:
        self.vcpu = vcpu
        self._run_call = run_call or fastrun.run_call()
        run = vcpu.run
        if run is None:
            raise AccelError(f"vCPU {vcpu.index} is closed")
        self._mm = vcpu.run_mmap
        #: KVM_RUN once plus the exit summary: the one place the compiled helper and ctypes differ.
        self._step: RunStep = fastrun.run_step(self._run_call, vcpu.fd, self._mm, ctypes.addressof(run))
        self.index = vcpu.index
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self.control = control
        self.halt_action = halt_action
        self.thread: threading.Thread | None = None
        self.ident: int | None = None
        self.last_exit: int | None = None
        self._cond = threading.Condition()
        self._pause_req = False
        self._stop_req = False
        self._resumes = 0  # counts resume() calls: a vCPU held after a request runs on after one
        self._calls: list[tuple[Callable[[], Any], list[Any]]] = []
        self._state = VcpuRunState.CREATED
        self._ctx = ExitContext(self.index, io_bus, mmio_bus, control, dump=self.dump_state)

    @property
    def run_call(self) -> RunCall:
        """How KVM_RUN is called (compiled helper if available, else ctypes); fixed at construction."""
        return self._run_call

    # -- the run state -----------------------------------------------------------------------------
    @property
    def state(self) -> VcpuRunState:
        return self._state

    @property
    def parked(self) -> bool:
        """Out of KVM_RUN and waiting (paused, or held after a device's request)."""
        return self._state in _PARKED

    @property
    def running(self) -> bool:
        """The loop is active on some thread (running, paused or held)."""
        return self._state in _ACTIVE

    def _set_state(self, new: VcpuRunState) -> None:
        """Move to ``new`` (with ``_cond`` held) and wake the waiters; an unlisted transition is a bug."""
        old = self._state
        if new not in _TRANSITIONS[old]:
            raise AccelError(f"vCPU {self.index}: run state cannot go from {old.value} to {new.value}")
        self._state = new
        self._cond.notify_all()

    # -- control from other threads ----------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self.running or (self.thread is not None and self.thread.is_alive()):
                raise AccelError(f"vCPU {self.index} is already running")
            self._stop_req = False
            self._set_state(VcpuRunState.RUNNING)
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN soon (safe from any thread, at any time)."""
        run = self.vcpu.run
        if run is not None:
            run.immediate_exit = 1
        ident = self.ident
        if ident is not None and ident != threading.get_ident():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # the thread has just ended

    def request_pause(self) -> None:
        with self._cond:
            self._pause_req = True
        self.kick()

    def wait_parked(self, timeout: float = 10.0) -> bool:
        """Wait until the thread is parked or no longer running; False on timeout."""
        if self.ident == threading.get_ident():
            return True  # parks when it returns to its loop
        with self._cond:
            return self._cond.wait_for(lambda: self.parked or not self.running, timeout)

    def resume(self) -> None:
        with self._cond:
            self._pause_req = False
            self._resumes += 1
            self._cond.notify_all()

    def request_stop(self) -> None:
        with self._cond:
            self._stop_req = True
            self._cond.notify_all()
        self.kick()

    def join(self, timeout: float = 10.0) -> None:
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                log.warning("vCPU %d thread did not stop within %.0fs", self.index, timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the vCPU thread (vCPU ioctls must not race KVM_RUN) and return its result.

        If the thread is parked, stopped or is the caller, ``fn`` runs right
        here: the vCPU is not in KVM_RUN then, and holding the lock keeps a
        parked thread parked meanwhile.
        """
        with self._cond:
            if not self.running or self.parked or self.ident == threading.get_ident():
                return fn()
            box: list[Any] = []
            self._calls.append((fn, box))
        self.kick()
        with self._cond:
            if not self._cond.wait_for(lambda: bool(box) or not self.running, timeout):
                raise AccelError(f"vCPU {self.index} did not answer within {timeout}s")
            if not box:
                return fn()  # the thread ended before serving us; the vCPU is idle now
        ok, value = box[0]
        if ok:
            return value
        raise value

    # -- the thread --------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the loop on this thread until it ends (single-threaded use, e.g. tests and benchmarks)."""
        with self._cond:
            self._set_state(VcpuRunState.RUNNING)
        self._thread_main()

    def _thread_main(self) -> None:
        self.ident = threading.get_ident()
        try:
            self._loop()
        except Exception as e:  # device bugs must not vanish with the thread
            log.exception("vCPU %d: unhandled error while handling an exit", self.index)
            self._ctx.fail(f"vCPU {self.index}: internal error: {type(e).__name__}: {e}")
        finally:
            with self._cond:
                # Calls still queued are served before STOPPED shows, so that a caller woken by
                # STOPPED knows its call was not run and runs it itself, never twice.
                self._serve_calls()
                self.ident = None
                self._set_state(VcpuRunState.STOPPED)

    def _serve(self, fn: Callable[[], Any], box: list[Any]) -> None:
        try:
            box.append((True, fn()))
        except Exception as e:
            box.append((False, e))

    def _serve_calls(self) -> None:
        """Run the queued calls (with ``_cond`` held)."""
        while self._calls:
            fn, box = self._calls.pop(0)
            self._serve(fn, box)
            self._cond.notify_all()

    def _service(self) -> bool:
        """Handle requests after a kick; returns False when the loop must end."""
        with self._cond:
            while True:
                self._serve_calls()
                if self._stop_req:
                    return False
                if not self._pause_req:
                    if self._state is VcpuRunState.PAUSED:
                        self._set_state(VcpuRunState.RUNNING)
                    return True
                if self._state is VcpuRunState.RUNNING:
                    self._set_state(VcpuRunState.PAUSED)
                self._cond.wait()

    def _loop(self) -> None:
        """KVM_RUN until something ends the loop (a stop request, a life-cycle request, HLT with "stop")."""
        if not self._service():
            return
        mm = self._mm
        run = self.vcpu.run
        assert run is not None
        run_once, (a0, a1, a2) = self._step.fn, self._step.args
        io_bus = self.io_bus
        PIO, PACK, MASK = _PIO_DATA_OFF, _PACK, _MASK
        handle = self._handle_exit
        service = self._service
        hold = self._hold_for_request
        requests = self._request_queue()
        EXIT_IO = _EXIT_IO
        OTHER_EXIT = fastrun.OTHER_EXIT
        exit_reason = kvm_exits.exit_reason
        while True:
            r = run_once(a0, a1, a2)
            if r > 0x7F:  # fastrun.SIMPLE_PIO: one port access, already decoded
                port = (r >> 12) & 0xFFFF
                # Bus.find, inlined: the entry found must itself cover the port, so a bus being
                # changed concurrently can only make us take the slow path, never call a wrong device.
                try:
                    s, e, dev, _ = (t := io_bus.table)[1][bisect_right(t[0], port) - 1]
                except IndexError:
                    s = e = 0
                if s <= port < e:
                    size = (r >> 9) & 7
                    if r & 0x100:  # fastrun.PIO_OUT
                        dev.io_write(port - s, size, r >> 28)
                    else:
                        PACK[size](mm, PIO, dev.io_read(port - s, size) & MASK[size])
                    if requests and not hold():
                        return
                    continue
                r = EXIT_IO  # unassigned port: the general handler answers it
            elif r < 0:
                if r != -errno.EINTR and r != -errno.EAGAIN:
                    raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {os.strerror(-r)}")
                run.immediate_exit = 0
                if not service():
                    self.last_exit = ExitReason.INTR
                    return
                continue
            elif r == OTHER_EXIT:  # an exit reason too large for the summary
                r = exit_reason(mm)
            if not handle(r) or (requests and not hold()):
                return

    def _handle_exit(self, reason: int) -> bool:
        """Handle one exit decoded from ``kvm_run`` (see :mod:`pyvmm.accel.kvm_exits`); False ends the loop."""
        if reason != _EXIT_IO and reason != _EXIT_MMIO:
            self.last_exit = reason
        action = handle_exit(reason, self._mm, self._ctx)
        if action is ExitAction.CONTINUE:
            return True
        if action is ExitAction.INTERRUPTED:
            run = self.vcpu.run
            assert run is not None
            run.immediate_exit = 0
            return self._service()
        if action is ExitAction.HALT:
            return self._on_hlt()
        return False

    def _request_queue(self) -> list[Any]:
        """The life-cycle mailbox's pending list, peeked without its lock after device accesses.

        Peeking is one truthiness test per exit; taking the mailbox's lock each time would cost more
        than the rest of the fast path.  The list object never changes (VmControl appends and pops).
        """
        queue = self.control.queue
        if not isinstance(queue, list):
            raise AccelError("VmControl no longer keeps its requests in a list; update VcpuRunner")
        return queue

    def _hold_for_request(self) -> bool:
        """A device on this thread posted a life-cycle request: stay out of the guest until stopped.

        The machine acts on most requests by stopping (or resetting) the accelerator, so the
        vCPU parks here until :meth:`request_stop`; pause() treats it as parked meanwhile.
        A request the machine answers by pausing instead (a guest panic under
        ``-action panic=pause``) ends the hold at the next resume: the vCPU then runs on
        (returns True), as QEMU's does after ``cont``.
        """
        log.debug("vCPU %d: holding after a life-cycle request from a device", self.index)
        with self._cond:
            self._set_state(VcpuRunState.HELD)
            resumes = self._resumes
            while not self._stop_req:
                self._serve_calls()
                if self._resumes != resumes and not self._pause_req:
                    self._set_state(VcpuRunState.RUNNING)  # paused with the request held, then resumed
                    return True
                self._cond.wait()
        return False

    def _on_hlt(self) -> bool:
        if self.halt_action == "stop":
            return False
        # No in-kernel irqchip, hence nothing can wake the vCPU but a request: idle politely.
        with self._cond:
            self._cond.wait(0.01)
        return self._service()

    # -- errors ------------------------------------------------------------------------------------
    @property
    def error_dump(self) -> str | None:
        """The register dump taken with the last fatal error, if any."""
        return self._ctx.error_dump

    def dump_state(self) -> str:
        """QEMU-style register dump; call on the vCPU thread or while it is parked/stopped."""
        vcpu = self.vcpu
        return f"CPU#{self.index}\n" + format_kvm_registers(vcpu.get_regs(), vcpu.get_sregs())
