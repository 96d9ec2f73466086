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

Hot path.  Port I/O is what most exits are, so a single port access is
handled inline in the loop with everything bound to locals and the bus lookup
(``Bus.find``) inlined as a bisect.  With the compiled helper
(:mod:`pyvmm.kvm.fastrun`) KVM_RUN returns that access already decoded in one
integer (port, size, direction, value); with the ctypes fallback one
precompiled ``struct`` unpack reads the exit reason together with
``kvm_run.io``.  Everything else (string I/O, MMIO, unassigned ports, other
exit reasons) goes through :meth:`VcpuRunner._handle_exit` and a dispatch
table built once per runner.

Life-cycle requests.  When a device posts a request (reset, power-off,
exit, error) during an access, the vCPU that made the access does not
re-enter the guest: it holds until the machine stops the accelerator, as
QEMU stops the current vCPU.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import struct
import threading
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from pyvmm.bus import Bus
from pyvmm.errors import AccelError, KvmError
from pyvmm.kvm import abi, fastrun
from pyvmm.kvm.dump import format_kvm_registers
from pyvmm.kvm.fastrun import RunCall
from pyvmm.kvm.ioctls import ExitReason, InternalError, Ioctl, SystemEvent
from pyvmm.kvm.syscall import get_errno
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.runstate import VmControl

log = logging.getLogger(__name__)

#: The signal used to kick vCPU threads out of KVM_RUN (QEMU uses SIGUSR1 for the same job).
KICK_SIGNAL = signal.SIGUSR1

_EXIT_OFF = abi.KVM_RUN_EXIT_OFFSET
_EXIT_REASON_OFF = abi.KVM_RUN_EXIT_REASON_OFFSET
_MMIO_DATA_OFF = _EXIT_OFF + abi.KvmRunMmio.data.offset
# exit_reason, then (skipping to the exit union) kvm_run.io: direction, size, port, count, data_offset.
_EXIT_HEAD = struct.Struct(f"<I{_EXIT_OFF - _EXIT_REASON_OFF - 4}xBBHIQ")
assert _EXIT_HEAD.size == _EXIT_OFF - _EXIT_REASON_OFF + ctypes.sizeof(abi.KvmRunIo)
# kvm_run.io: direction, size, port, count, data_offset.
_PIO_HEAD = struct.Struct("<BBHIQ")
assert _PIO_HEAD.size == ctypes.sizeof(abi.KvmRunIo)
#: Where KVM puts port I/O data (KVM_PIO_PAGE_OFFSET pages into the vCPU mapping); the compiled
#: helper pre-decodes an access only if ``data_offset`` is exactly this.
_PIO_DATA_OFF = 4096
# kvm_run.mmio: phys_addr, data[8], len, is_write.
_MMIO_HEAD = struct.Struct("<Q8sIB")
assert _MMIO_HEAD.size == abi.KvmRunMmio.is_write.offset + 1
# Keyed by access size in bytes: a size missing here is a malformed exit.
_UNPACK: dict[int, Any] = {1: struct.Struct("<B").unpack_from, 2: struct.Struct("<H").unpack_from,
                           4: struct.Struct("<I").unpack_from}
_PACK: dict[int, Any] = {1: struct.Struct("<B").pack_into, 2: struct.Struct("<H").pack_into,
                         4: struct.Struct("<I").pack_into}
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


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
        #: How KVM_RUN is called (compiled helper if available, else ctypes).
        self.run_call = run_call or fastrun.run_call()
        self.index = vcpu.index
        self.io_bus = io_bus
        self.mmio_bus = mmio_bus
        self.control = control
        self.halt_action = halt_action
        self.thread: threading.Thread | None = None
        self.ident: int | None = None
        self.last_exit: int | None = None
        self.error_dump: str | None = None
        self._cond = threading.Condition()
        self._pause_req = False
        self._stop_req = False
        self._resumes = 0  # counts resume() calls: a vCPU held after a request runs on after one
        self._calls: list[tuple[Callable[[], Any], list[Any]]] = []
        self.parked = False
        self.running = False  # True while the loop is active on some thread
        self._dispatch = self._dispatch_table()

    # -- control from other threads ----------------------------------------------------------------
    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            raise AccelError(f"vCPU {self.index} is already running")
        with self._cond:
            self._stop_req = False
            self.running = True
        self.thread = threading.Thread(target=self.run, name=f"vcpu{self.index}", daemon=True)
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
        """The thread body (callable directly for single-threaded use, e.g. benchmarks)."""
        self.ident = threading.get_ident()
        with self._cond:
            self.running = True
        try:
            self._loop()
        except Exception as e:  # device bugs must not vanish with the thread
            log.exception("vCPU %d: unhandled error while handling an exit", self.index)
            self._fail(f"vCPU {self.index}: internal error: {type(e).__name__}: {e}")
        finally:
            with self._cond:
                self.running = False
                self.parked = False
                calls, self._calls = self._calls, []
                self._cond.notify_all()
            for fn, box in calls:
                self._serve(fn, box)
            self.ident = None

    def _serve(self, fn: Callable[[], Any], box: list[Any]) -> None:
        try:
            box.append((True, fn()))
        except Exception as e:
            box.append((False, e))

    def _service(self) -> bool:
        """Handle requests after a kick; returns False when the loop must end."""
        with self._cond:
            while True:
                while self._calls:
                    fn, box = self._calls.pop(0)
                    self._serve(fn, box)
                    self._cond.notify_all()
                if self._stop_req:
                    return False
                if not self._pause_req:
                    if self.parked:
                        self.parked = False
                        self._cond.notify_all()
                    return True
                if not self.parked:
                    self.parked = True
                    self._cond.notify_all()
                self._cond.wait()

    def _loop(self) -> None:
        if not self._service():
            return
        if self.run_call.run is not None:
            self._loop_summarized()
        else:
            self._loop_plain()

    def _loop_summarized(self) -> None:
        """The loop with the compiled helper, which hands back single port accesses pre-decoded."""
        vcpu = self.vcpu
        mm = vcpu.run_mmap
        run = vcpu.run
        assert run is not None and self.run_call.run is not None
        fd = vcpu.fd
        krun = self.run_call.run
        run_addr = ctypes.addressof(run)
        PIO = _PIO_DATA_OFF
        assert PIO + 4 <= len(mm)
        io_bus = self.io_bus
        PACK, MASK = _PACK, _MASK
        handle = self._handle_exit
        service = self._service
        hold = self._hold_for_request
        requests = self._request_queue()
        EXIT_IO = int(ExitReason.IO)
        OTHER_EXIT = fastrun.OTHER_EXIT
        while True:
            r = krun(fd, run_addr, PIO)
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
                r = EXIT_IO  # unassigned port: the general path logs it
            elif r < 0:
                if r != -errno.EINTR and r != -errno.EAGAIN:
                    raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {os.strerror(-r)}")
                run.immediate_exit = 0
                if not service():
                    self.last_exit = ExitReason.INTR
                    return
                continue
            elif r == OTHER_EXIT:  # an exit reason too large for the summary
                r = run.exit_reason
            if not handle(r) or (requests and not hold()):
                return

    def _loop_plain(self) -> None:
        """The loop with the ctypes call: exits decoded from ``kvm_run`` in Python.

        A single port access is still handled inline (one unpack reads the exit
        reason together with ``kvm_run.io``); everything else goes through
        :meth:`_handle_exit`.
        """
        vcpu = self.vcpu
        mm = vcpu.run_mmap
        run = vcpu.run
        assert run is not None
        fd = vcpu.fd
        ioctl = self.run_call.fn
        negative_errno = self.run_call.negative_errno
        KVM_RUN = int(Ioctl.RUN)
        head = _EXIT_HEAD.unpack_from
        io_bus = self.io_bus
        UNPACK, PACK, MASK = _UNPACK, _PACK, _MASK
        limit = len(mm) - 4
        handle = self._handle_exit
        service = self._service
        hold = self._hold_for_request
        requests = self._request_queue()
        EXIT_IO = int(ExitReason.IO)
        while True:
            r = ioctl(fd, KVM_RUN, 0)
            if r < 0:
                err = -r if negative_errno else get_errno()
                if err != errno.EINTR and err != errno.EAGAIN:
                    raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {os.strerror(err)}")
                run.immediate_exit = 0
                if not service():
                    self.last_exit = ExitReason.INTR
                    return
                continue
            reason, out, size, port, count, off = head(mm, _EXIT_REASON_OFF)
            if reason == EXIT_IO and count == 1 and off <= limit:
                unpack = UNPACK.get(size)
                if unpack is not None:
                    try:  # Bus.find, inlined (see _loop_summarized)
                        s, e, dev, _ = (t := io_bus.table)[1][bisect_right(t[0], port) - 1]
                    except IndexError:
                        s = e = 0
                    if s <= port < e:
                        if out:
                            dev.io_write(port - s, size, unpack(mm, off)[0])
                        else:
                            PACK[size](mm, off, dev.io_read(port - s, size) & MASK[size])
                        if requests and not hold():
                            return
                        continue
            if not handle(reason) or (requests and not hold()):
                return

    def _handle_exit(self, reason: int) -> bool:
        """Handle one exit decoded from ``kvm_run``; False ends the loop."""
        if reason == ExitReason.IO:
            return self._pio_exit()
        if reason == ExitReason.MMIO:
            return self._mmio_exit()
        self.last_exit = reason
        return self._dispatch.get(reason, self._unexpected_exit)(reason)

    def _pio_exit(self) -> bool:
        """KVM_EXIT_IO, including string I/O (``count`` items) and unassigned ports."""
        mm = self.vcpu.run_mmap
        out, size, port, count, off = _PIO_HEAD.unpack_from(mm, _EXIT_OFF)
        unpack = _UNPACK.get(size)
        if unpack is None or off + size * count > len(mm):
            self._fail(f"vCPU {self.index}: malformed I/O exit (port {port:#x} size {size} "
                       f"count {count} offset {off:#x})")
            return False
        bus = self.io_bus
        hit = bus.find(port)
        if out:
            if hit is None:
                for i in range(count):
                    bus.write(port, size, unpack(mm, off + i * size)[0])
            else:
                write, rel = hit[1].io_write, port - hit[0]
                for i in range(count):
                    write(rel, size, unpack(mm, off + i * size)[0])
        else:
            pack = _PACK[size]
            if hit is None:
                for i in range(count):
                    pack(mm, off + i * size, bus.read(port, size))
            else:
                read, rel, mask = hit[1].io_read, port - hit[0], _MASK[size]
                for i in range(count):
                    pack(mm, off + i * size, read(rel, size) & mask)
        return True

    def _mmio_exit(self) -> bool:
        """KVM_EXIT_MMIO: 1..8 bytes at ``phys_addr``; reads are answered in ``mmio.data``."""
        mm = self.vcpu.run_mmap
        addr, data, n, is_write = _MMIO_HEAD.unpack_from(mm, _EXIT_OFF)
        if not 1 <= n <= 8:
            self._fail(f"vCPU {self.index}: malformed MMIO exit (len {n} at {addr:#x})")
            return False
        bus = self.mmio_bus
        try:
            s, e, dev, _ = (t := bus.table)[1][bisect_right(t[0], addr) - 1]
        except IndexError:
            s = e = 0
        if is_write:
            value = int.from_bytes(data[:n], "little")
            if s <= addr < e:
                dev.io_write(addr - s, n, value)
            else:
                bus.write(addr, n, value)
        else:
            if s <= addr < e:
                value = dev.io_read(addr - s, n) & ((1 << (8 * n)) - 1)
            else:
                value = bus.read(addr, n)
            mm[_MMIO_DATA_OFF:_MMIO_DATA_OFF + n] = value.to_bytes(n, "little")
        return True

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
            self.parked = True
            self._cond.notify_all()
            resumes = self._resumes
            while not self._stop_req:
                while self._calls:
                    fn, box = self._calls.pop(0)
                    self._serve(fn, box)
                    self._cond.notify_all()
                if self._resumes != resumes and not self._pause_req:
                    self.parked = False
                    self._cond.notify_all()
                    return True
                self._cond.wait()
            self.parked = False
        return False

    # -- slow-path exits ---------------------------------------------------------------------------
    def _dispatch_table(self) -> dict[int, Callable[[int], bool]]:
        return {
            ExitReason.HLT: self._on_hlt,
            ExitReason.SHUTDOWN: self._on_shutdown,
            ExitReason.SYSTEM_EVENT: self._on_system_event,
            ExitReason.FAIL_ENTRY: self._on_fail_entry,
            ExitReason.INTERNAL_ERROR: self._on_internal_error,
            ExitReason.INTR: self._on_intr,
            ExitReason.IRQ_WINDOW_OPEN: self._on_ignore,
            ExitReason.NMI: self._on_ignore,
            ExitReason.HYPERCALL: self._on_hypercall,
        }

    def _on_intr(self, reason: int) -> bool:
        run = self.vcpu.run
        assert run is not None
        run.immediate_exit = 0
        return self._service()

    def _on_ignore(self, reason: int) -> bool:
        return True

    def _on_hlt(self, reason: int) -> bool:
        if self.halt_action == "stop":
            return False
        # No in-kernel irqchip, hence nothing can wake the vCPU but a request: idle politely.
        with self._cond:
            self._cond.wait(0.01)
        return self._service()

    def _on_shutdown(self, reason: int) -> bool:
        log.info("vCPU %d: shutdown (triple fault)\n%s", self.index, self._safe_dump())
        self.control.request_reset("triple fault")
        return False

    def _on_system_event(self, reason: int) -> bool:
        run = self.vcpu.run
        assert run is not None
        kind = run.u.system_event.type
        if kind == SystemEvent.SHUTDOWN:
            self.control.request_poweroff("guest requested power-off")
        elif kind == SystemEvent.RESET:
            self.control.request_reset("guest requested reset")
        elif kind == SystemEvent.CRASH:
            self._fail(f"vCPU {self.index}: guest crashed (system event)")
        else:
            log.debug("vCPU %d: ignoring system event %d", self.index, kind)
            return True
        return False

    def _on_fail_entry(self, reason: int) -> bool:
        run = self.vcpu.run
        assert run is not None
        hw = run.u.fail_entry.hardware_entry_failure_reason
        self._fail(f"vCPU {self.index}: KVM entry failed, hardware error {hw:#x}")
        return False

    def _on_internal_error(self, reason: int) -> bool:
        run = self.vcpu.run
        assert run is not None
        internal = run.u.internal
        sub = internal.suberror
        try:
            what = InternalError(sub).name.lower().replace("_", " ")
        except ValueError:
            what = f"suberror {sub}"
        detail = ""
        ndata = min(internal.ndata, 16)
        if sub == InternalError.EMULATION and ndata >= 3 and internal.data[0] & 1:
            raw = bytes(internal)[16:32]  # emulation_failure: insn_size, then up to 15 instruction bytes
            n = min(raw[0], 15)
            detail = " (instruction bytes: " + " ".join(f"{b:02x}" for b in raw[1:1 + n]) + ")"
        elif ndata:
            detail = " (data: " + " ".join(f"{internal.data[i]:#x}" for i in range(ndata)) + ")"
        self._fail(f"vCPU {self.index}: KVM internal error: {what}{detail}")
        return False

    def _on_hypercall(self, reason: int) -> bool:
        run = self.vcpu.run
        assert run is not None
        run.u.hypercall.ret = (-1000) & 0xFFFFFFFFFFFFFFFF  # -KVM_ENOSYS
        return True

    def _unexpected_exit(self, reason: int) -> bool:
        try:
            name = ExitReason(reason).name
        except ValueError:
            name = str(reason)
        self._fail(f"vCPU {self.index}: unexpected KVM exit reason {name}")
        return False

    # -- errors ------------------------------------------------------------------------------------
    def _safe_dump(self) -> str:
        try:
            return self.dump_state()
        except Exception as e:  # the dump is diagnostics; never let it hide the original error
            return f"(register dump unavailable: {e})"

    def dump_state(self) -> str:
        """QEMU-style register dump; call on the vCPU thread or while it is parked/stopped."""
        vcpu = self.vcpu
        return f"CPU#{self.index}\n" + format_kvm_registers(vcpu.get_regs(), vcpu.get_sregs())

    def _fail(self, reason: str) -> None:
        text = self._safe_dump()
        self.error_dump = text
        log.error("%s\n%s", reason, text)
        self.control.request_error(reason)
