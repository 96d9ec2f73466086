"""One ``pyvmm run`` process per VM, controlled over QMP, re-attached after a daemon restart.

As libvirt runs one qemu per guest, the supervisor starts each VM as its own
process: in its own session (so a dying daemon does not take it along), with
a cleaned environment, no inherited file descriptors, stdin on /dev/null and
stdout/stderr in a per-VM log.  The process serves QMP and its serial port on
unix sockets in the VM's run directory.  The pid, its start time and the
socket paths are written to the store *before* the daemon waits for the VM to
come up, so a daemon that dies at any point can find the VM again: on start
the supervisor checks each recorded pid is alive and is that VM (start time
and the uuid on its command line), reconnects QMP and the serial port, and
carries on.  Everything here runs on the daemon's asyncio loop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import grp
import logging
import os
import pwd
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from qemu.qmp import ConnectError, QMPClient

from pyvmm.manager import stats as procstats
from pyvmm.manager import vmlock
from pyvmm.manager.diskfull import status_and_message
from pyvmm.manager.logcap import MAX_LOG_BYTES
from pyvmm.manager.models import (
    Event,
    VmDefinition,
    VmDefinitionIn,
    VmInfo,
    VmState,
    VmStats,
    VmStatsReport,
    check_files,
)
from pyvmm.manager.store import RuntimeRecord, Store, StoreError

log = logging.getLogger(__name__)

SCROLLBACK_BYTES = 256 * 1024
STATS_HISTORY = 300
SUBSCRIBER_QUEUE = 1024
EVENT_HISTORY = 200
#: The line ``pyvmm run`` logs once it has chosen its accelerator.
ACCEL_LINE = re.compile(r"^pyvmm: (?:\S+ )?accelerator: (kvm|tcg) \((.*)\)$", re.M)


class ManagerError(Exception):
    """An operation failed in a way the client caused or must know about; carries an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(name: str) -> ManagerError:
    return ManagerError(404, f"no VM named {name!r}")


@dataclass
class ManagerConfig:
    """Where the daemon keeps its files and how it starts VMs."""

    state_dir: Path
    #: The command that runs one VM; the supervisor appends the machine options.
    pyvmm_command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "pyvmm", "run"])
    #: When the daemon runs as root and this user exists, VM processes run as that user.
    vm_user: str | None = None
    start_timeout: float = 20.0
    stats_interval: float = 1.0
    #: VM processes run under ``-sandbox on`` (a seccomp allow-list once set up; docs/sandbox.md).
    sandbox: bool = True
    #: A VM's vm.log is rotated to vm.log.1 when it would pass this size (pyvmm.manager.logcap).
    max_log_bytes: int = MAX_LOG_BYTES
    #: The relay that writes a VM's log (stdin: the VM's output; the log file's name is appended).
    log_relay_command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "pyvmm.manager.logcap"])

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "pyvmmd.sqlite3"


class Broadcaster:
    """Fan-out of items to subscriber queues; a subscriber too slow to keep up loses items, not the daemon."""

    def __init__(self) -> None:
        self._subs: set[asyncio.Queue] = set()

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subs.discard(q)

    def publish(self, item: Any) -> None:
        for q in list(self._subs):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(item)


class VmHandle:
    """A VM's definition plus everything the daemon knows about its process right now."""

    def __init__(self, definition: VmDefinition) -> None:
        self.definition = definition
        self.state = VmState.SHUTOFF
        self.reason = ""
        self.pid: int | None = None
        self.start_ticks = 0
        self.proc: subprocess.Popen | None = None  # set only when this daemon instance started it
        self.relay: subprocess.Popen | None = None  # its log relay (pyvmm.manager.logcap), likewise
        self.paths: RuntimeRecord | None = None
        self.qmp: QMPClient | None = None
        self.serial_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task] = []
        self.scrollback = bytearray()
        self.console = Broadcaster()
        self.history: deque[VmStats] = deque(maxlen=STATS_HISTORY)
        self.cpu = procstats.CpuSampler()
        self.lock = asyncio.Lock()
        self.destroying = False
        self.last_shutdown_cause = ""
        self.exited = asyncio.Event()
        self.id: int | None = None
        self.accelerator: str | None = None
        self.accelerator_reason = ""
        self.events: deque[Event] = deque(maxlen=EVENT_HISTORY)
        #: ``-incoming URI`` for the next start only (restore, clone, migration; pyvmm.manager.vmstate_ops).
        self.incoming: str | None = None
        #: ...and whether its disks are still in use by the migration's source (no image locks then).
        self.incoming_shared_disks = False

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def uuid(self) -> str:
        return str(self.definition.uuid)

    @property
    def active(self) -> bool:
        return self.pid is not None

    def info(self) -> VmInfo:
        return VmInfo(name=self.name, uuid=self.uuid, state=self.state, reason=self.reason, id=self.id,
                      pid=self.pid, accelerator=self.accelerator, accelerator_reason=self.accelerator_reason,
                      definition=self.definition)

    def add_output(self, data: bytes) -> None:
        self.scrollback += data
        if len(self.scrollback) > SCROLLBACK_BYTES:
            del self.scrollback[:len(self.scrollback) - SCROLLBACK_BYTES]
        self.console.publish(data)


#: Which operations each state allows (anything else is a 409 naming the state).
ALLOWED: dict[str, tuple[VmState, ...]] = {
    "start": (VmState.SHUTOFF, VmState.CRASHED),
    "shutdown": (VmState.RUNNING, VmState.PAUSED, VmState.SHUTTING_DOWN),
    "destroy": (VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.SHUTTING_DOWN),
    "suspend": (VmState.RUNNING, VmState.SHUTTING_DOWN),
    "resume": (VmState.PAUSED,),
    "reboot": (VmState.RUNNING, VmState.SHUTTING_DOWN),
    "undefine": (VmState.SHUTOFF, VmState.CRASHED),
    "edit": (VmState.SHUTOFF, VmState.CRASHED),
    "send-key": (VmState.RUNNING, VmState.SHUTTING_DOWN),
    "snapshot": (VmState.RUNNING, VmState.PAUSED),
    "migrate": (VmState.RUNNING, VmState.PAUSED),
}


def random_mac() -> str:
    """A MAC in QEMU's and libvirt's locally administered 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def failure_line(log_tail: str) -> str:
    """The one line of a VM process's log that says why it failed: its last ``error:`` line, else its last line."""
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    for line in reversed(lines):
        _, sep, rest = line.partition("error: ")
        if sep:
            return rest
    return lines[-1] if lines else "no output"


def accelerator_from_log(text: str) -> tuple[str, str] | None:
    """(name, reason) from the VM process's ``accelerator: NAME (REASON)`` line."""
    m = ACCEL_LINE.search(text)
    return (m.group(1), m.group(2)) if m else None


def clean_environment() -> dict[str, str]:
    """The VM process's environment: a fixed PATH and locale, plus PYTHONPATH so a source-tree
    daemon runs the same pyvmm; nothing else of the daemon's (tokens, proxies, ...) leaks in."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PYTHONUNBUFFERED": "1"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _short_path(path: str, dirfd: int) -> str:
    """A path to connect to a socket by: the path itself if it fits in sockaddr_un, else the same file
    reached through the open directory ``dirfd`` under /proc/self/fd."""
    if len(os.fsencode(path)) < 108:
        return path
    return f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"


def _escape_opt(value: str) -> str:
    """QEMU-style option values: a literal comma is written twice."""
    return value.replace(",", ",,")


def _create_private_file(path: Path) -> int:
    """A new file at ``path`` (any old file or symlink there is removed first; O_EXCL never follows links)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _read_tail(path: Path, limit: int = 64 << 10) -> str:
    """The last ``limit`` bytes of a regular file, without following a symlink ("" if unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return ""
        f.seek(max(0, st.st_size - limit))
        return f.read(limit).decode(errors="replace")


async def _connect_unix(path: str, timeout: float = 2.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a unix socket, retrying while it is bound but not yet listening (a VM process binds its
    socket file a moment before it listens; on a loaded host that moment is long enough to hit)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.open_unix_connection(path)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


class Supervisor:
    """Owns all VM handles; every public coroutine is one API operation."""

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config.run_dir.mkdir(exist_ok=True, mode=0o700)
        self.store = Store(config.db_path)
        self.vms: dict[str, VmHandle] = {}  # by uuid
        self.events = Broadcaster()
        self._seq = 0
        self._tasks: list[asyncio.Task] = []
        self._timers: set[asyncio.Task] = set()
        self._relays: builtins.list[subprocess.Popen] = []  # log relays this daemon started, reaped when done
        self._next_id = 1
        self._run_as = self._resolve_user(config.vm_user)
        if self._run_as is not None:
            # The VM user must reach its own run directory (chowned to it in _spawn), and nothing else:
            # traverse-only on the way there.
            os.chmod(config.state_dir, 0o711)
            os.chmod(config.run_dir, 0o711)

    # -- life of the daemon ----------------------------------------------------------------
    async def open(self) -> None:
        """Load definitions, re-attach to VMs that survived a daemon restart, autostart the rest."""
        records = self.store.runtimes()
        for d in self.store.all():
            self.vms[str(d.uuid)] = VmHandle(d)
        for uuid, rec in records.items():
            h = self.vms.get(uuid)
            if h is None:
                continue
            if procstats.is_vm_process(rec.pid, rec.start_ticks, uuid):
                try:
                    await self._attach(h, rec)
                    log.info("re-attached to VM %s (pid %d)", h.name, rec.pid)
                    continue
                except (OSError, ManagerError) as e:
                    log.warning("VM %s (pid %d) is alive but cannot be re-attached: %s", h.name, rec.pid, e)
                    h.pid, h.start_ticks, h.paths = rec.pid, rec.start_ticks, rec
                    h.tasks = [asyncio.create_task(self._watch(h), name=f"watch-{h.name}")]
                    self._set_state(h, VmState.RUNNING, f"re-attach failed: {e}")
                    continue
            if await self._adopt(h):
                continue
            self._forget_runtime(uuid)
            self._cleanup_files(uuid)
            self._set_state(h, VmState.SHUTOFF, "the VM process ended while the daemon was down")
        for h in list(self.vms.values()):
            # A VM process the daemon started but could not record (it died first, or the disk was full).
            if not h.active and h.uuid not in records:
                await self._adopt(h)
        for h in list(self.vms.values()):
            if h.definition.autostart and not h.active:
                try:
                    await self.start(h.name)
                except ManagerError as e:
                    log.warning("autostart of %s failed: %s", h.name, e.message)
        self._tasks.append(asyncio.create_task(self._sample_stats(), name="stats"))

    async def close(self) -> None:
        """Detach from all VMs; they keep running (a restarted daemon re-attaches)."""
        for t in [*self._tasks, *self._timers]:
            t.cancel()
        for h in self.vms.values():
            await self._detach(h)
        self.store.close()

    # -- definitions ------------------------------------------------------------------------
    def list(self) -> list[VmInfo]:
        return [h.info() for h in sorted(self.vms.values(), key=lambda h: h.name)]

    def get(self, name: str) -> VmHandle:
        """A VM by name or by uuid."""
        for h in self.vms.values():
            if h.name == name:
                return h
        by_uuid = self.vms.get(name)
        if by_uuid is None:
            raise not_found(name)
        return by_uuid

    @staticmethod
    def with_default_guest(din: VmDefinitionIn) -> VmDefinitionIn:
        """``din`` with the guest kit's default guest filled in when it names no kernel (blocking: the
        first call may fetch the kernel and build the initramfs; run it in a thread)."""
        if din.kernel is not None:
            return din
        from pyvmm.guestkit import GuestKitError, default_guest

        try:
            guest = default_guest()
        except GuestKitError as e:
            raise ManagerError(400, f"no kernel given, and the guest kit's default guest is unavailable: {e}") \
                from None
        return din.model_copy(update={"kernel": str(guest.kernel), "initrd": din.initrd or str(guest.initrd),
                                      "cmdline": din.cmdline or guest.cmdline})

    @staticmethod
    def _checked(din: VmDefinitionIn, uuid: uuidlib.UUID) -> VmDefinition:
        """The stored form of ``din``: files checked, NICs given MACs (as libvirt does, so they stay put)."""
        if din.kernel is None:
            raise ManagerError(400, "kernel: required (the daemon fills in the default guest)")
        try:
            check_files(din)
        except ValueError as e:
            raise ManagerError(400, str(e)) from None
        data = din.model_dump()
        for net in data["networks"]:
            net["mac"] = net["mac"] or random_mac()
        return VmDefinition.model_validate({**data, "uuid": uuid})

    def define(self, din: VmDefinitionIn) -> VmHandle:
        if any(h.name == din.name for h in self.vms.values()):
            raise ManagerError(409, f"a VM named {din.name!r} already exists")
        d = self._checked(din, din.uuid or uuidlib.uuid4())
        if str(d.uuid) in self.vms:
            raise ManagerError(409, f"a VM with uuid {d.uuid} already exists")
        try:
            self._store_write(f"cannot store VM {d.name}", self.store.add, d)
        except StoreError as e:
            raise ManagerError(409, str(e)) from None
        h = VmHandle(d)
        self.vms[str(d.uuid)] = h
        self._publish(h, "defined")
        return h

    def update(self, name: str, din: VmDefinitionIn) -> VmHandle:
        """Replace a shut-off VM's definition (``edit``, ``attach-disk``...); the uuid stays."""
        h = self.get(name)
        self._require(h, "edit")
        if din.uuid is not None and din.uuid != h.definition.uuid:
            raise ManagerError(409, f"VM {h.name}: the uuid cannot be changed (it is {h.uuid})")
        if din.name != h.name and any(o.name == din.name for o in self.vms.values()):
            raise ManagerError(409, f"a VM named {din.name!r} already exists")
        d = self._checked(din, h.definition.uuid)
        try:
            self._store_write(f"cannot store VM {d.name}", self.store.update, d)
        except StoreError as e:
            raise ManagerError(409, str(e)) from None
        h.definition = d
        self._publish(h, "updated")
        return h

    def vm_log(self, name: str, limit: int = 64 << 10) -> tuple[Path, str]:
        """The VM process's log file and its last ``limit`` bytes."""
        h = self.get(name)
        path = self._vm_dir(h.uuid) / "vm.log"
        return path, _read_tail(path, limit)

    def events_of(self, name: str) -> builtins.list[Event]:
        return builtins.list(self.get(name).events)

    def undefine(self, name: str) -> None:
        h = self.get(name)
        self._require(h, "undefine")
        if vmlock.is_held(self._vm_dir(h.uuid)):
            raise ManagerError(409, f"cannot undefine VM {h.name}: a process of it is still running (it holds "
                                    f"{self._vm_dir(h.uuid) / vmlock.LOCK_NAME}); start it to take it over")
        self._store_write(f"cannot remove VM {h.name}", self.store.remove, h.uuid)
        del self.vms[h.uuid]
        self._cleanup_files(h.uuid)
        self._publish(h, "undefined")

    # -- life-cycle operations ----------------------------------------------------------------
    async def start(self, name: str, incoming: str | None = None, shared_disks: bool = False) -> VmHandle:
        """Start the VM's process (with ``-incoming INCOMING``: waiting for its state, not booting)."""
        h = self.get(name)
        async with h.lock:
            self._require(h, "start")
            d = h.definition
            try:
                check_files(d)
            except ValueError as e:
                raise ManagerError(409, f"VM {h.name} cannot start: {e}") from None
            if vmlock.is_held(self._vm_dir(h.uuid)) and await self._adopt(h):
                raise ManagerError(409, f"VM {h.name} is already running (pid {h.pid}, a process this daemon "
                                        "had lost track of; it is tracked again)")
            self._set_state(h, VmState.STARTING, "")
            h.incoming, h.incoming_shared_disks = incoming, shared_disks
            try:
                await self._spawn(h)
            except ManagerError:
                self._set_state(h, VmState.SHUTOFF, h.reason or "failed to start")
                raise
            except BaseException as e:  # whatever failed, the VM is not left "starting"
                status, message = status_and_message(e, f"VM {h.name} failed to start")
                log.warning("%s", message, exc_info=not isinstance(e, (OSError, sqlite3.Error)))
                self._set_state(h, VmState.SHUTOFF, message)
                if isinstance(e, Exception):
                    raise ManagerError(status, message) from None
                raise
            finally:
                h.incoming, h.incoming_shared_disks = None, False
        return h

    async def shutdown(self, name: str, timeout: float = 0.0) -> VmHandle:
        """Ask the guest to power off (ACPI power button); after ``timeout`` seconds (0: never) destroy it."""
        h = self.get(name)
        async with h.lock:
            self._require(h, "shutdown")
            await self._qmp(h, "system_powerdown")
            self._set_state(h, VmState.SHUTTING_DOWN, "power button pressed")
        if timeout > 0:
            task = asyncio.create_task(self._destroy_after(h, timeout))
            self._timers.add(task)  # a strong reference until it is done
            task.add_done_callback(self._timers.discard)
        return h

    async def _destroy_after(self, h: VmHandle, timeout: float) -> None:
        pid = h.pid
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(h.exited.wait(), timeout)
            return
        if h.pid == pid and h.active:
            log.info("VM %s did not power off within %.0fs: destroying it", h.name, timeout)
            with contextlib.suppress(ManagerError):
                await self.destroy(h.name)

    async def destroy(self, name: str) -> VmHandle:
        """Stop the VM at once: QMP quit, and SIGKILL if it has not exited within 2 seconds."""
        h = self.get(name)
        async with h.lock:
            self._require(h, "destroy")
            h.destroying = True
            if h.qmp is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(h.qmp.execute("quit"), 2.0)
            if not await self._wait_exit(h, 2.0):
                self._kill(h)
                if not await self._wait_exit(h, 5.0):
                    raise ManagerError(409, f"VM {h.name}: process {h.pid} survived SIGKILL")
        return h

    async def suspend(self, name: str) -> VmHandle:
        return await self._simple(name, "suspend", "stop")

    async def resume(self, name: str) -> VmHandle:
        return await self._simple(name, "resume", "cont")

    async def reboot(self, name: str) -> VmHandle:
        return await self._simple(name, "reboot", "system_reset")

    async def _simple(self, name: str, op: str, command: str) -> VmHandle:
        h = self.get(name)
        async with h.lock:
            self._require(h, op)
            await self._qmp(h, command)
            # The STOP/RESUME event also sets the state; setting it here makes the answer current.
            if op == "suspend":
                self._set_state(h, VmState.PAUSED, "suspended")
            elif op == "resume":
                self._set_state(h, VmState.RUNNING, "resumed")
            else:
                self._publish(h, "reset")
        return h

    async def send_key(self, name: str, keys: builtins.list[str]) -> VmHandle:
        """Press ``keys`` (QEMU key names) together on the VM's keyboard (QMP send-key)."""
        h = self.get(name)
        async with h.lock:
            self._require(h, "send-key")
            await self._qmp(h, "send-key", {"keys": [{"type": "qcode", "data": k} for k in keys]})
            self._publish(h, "key")
        return h

    def stats(self, name: str) -> VmStatsReport:
        h = self.get(name)
        hist = list(h.history)
        return VmStatsReport(current=hist[-1] if hist and h.active else None, history=hist)

    def console_write(self, h: VmHandle, data: bytes) -> None:
        if h.serial_writer is not None and not h.serial_writer.is_closing():
            h.serial_writer.write(data)

    # -- helpers -------------------------------------------------------------------------------
    def _require(self, h: VmHandle, op: str) -> None:
        if h.state not in ALLOWED[op]:
            raise ManagerError(409, f"cannot {op} VM {h.name}: it is {h.state.value}")

    async def _qmp(self, h: VmHandle, command: str, args: dict | None = None) -> Any:
        if h.qmp is None:
            raise ManagerError(409, f"VM {h.name}: no QMP connection to its process")
        try:
            return await asyncio.wait_for(h.qmp.execute(command, args), 5.0)
        except TimeoutError:
            raise ManagerError(409, f"VM {h.name}: QMP {command} timed out") from None
        except Exception as e:  # ExecuteError, ConnectionError, StateError: all mean the VM did not do it
            raise ManagerError(409, f"VM {h.name}: QMP {command} failed: {e}") from None

    def _set_state(self, h: VmHandle, state: VmState, reason: str) -> None:
        changed = (state, reason) != (h.state, h.reason)
        h.state, h.reason = state, reason
        if changed:
            self._publish(h, "state")

    def _publish(self, h: VmHandle, name: str) -> None:
        self._seq += 1
        ev = Event(seq=self._seq, timestamp=time.time(), name=name, vm=h.name, uuid=h.uuid, state=h.state,
                   reason=h.reason)
        h.events.append(ev)
        self.events.publish(ev)

    @staticmethod
    def _resolve_user(user: str | None) -> tuple[int, int, builtins.list[int]] | None:
        if user is None or os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            log.warning("vm user %r does not exist: VM processes run as the daemon's user", user)
            return None
        extra = []
        with contextlib.suppress(KeyError):
            extra.append(grp.getgrnam("kvm").gr_gid)  # /dev/kvm access
        return pw.pw_uid, pw.pw_gid, extra

    def _vm_dir(self, uuid: str) -> Path:
        return self.config.run_dir / uuid

    def _store_write(self, doing: str, write: Callable[..., Any], *args: Any) -> Any:
        """A store write; a failed one (full disk, I/O error) becomes a ManagerError (507 or 500) saying so."""
        try:
            return write(*args)
        except (sqlite3.Error, OSError) as e:
            status, message = status_and_message(e, doing)
            log.warning("%s", message)
            raise ManagerError(status, message) from None

    def _forget_runtime(self, uuid: str) -> None:
        """Drop a VM's runtime record; a failure is logged (the record is checked against /proc when read)."""
        try:
            self.store.clear_runtime(uuid)
        except (sqlite3.Error, OSError) as e:
            log.warning("cannot drop the runtime record of VM %s: %s", uuid, e)

    async def _adopt(self, h: VmHandle) -> bool:
        """Take over a live process of ``h`` found by its VM lock (see pyvmm.manager.vmlock); True if found."""
        vmdir = self._vm_dir(h.uuid)
        if h.active or not vmlock.is_held(vmdir):
            return False
        found = []
        for pid in vmlock.holders(vmdir, h.uuid):
            st = procstats.read_stat(pid)
            if st is not None and st.state not in ("Z", "X"):
                found.append((st.start_ticks, pid))
        if not found:
            return False
        start_ticks, pid = min(found)  # the VM process itself, not a child it forked
        rec = RuntimeRecord(uuid=h.uuid, pid=pid, start_ticks=start_ticks, qmp_path=str(vmdir / "qmp.sock"),
                            serial_path=str(vmdir / "serial.sock"), log_path=str(vmdir / "vm.log"),
                            started=time.time())
        log.warning("VM %s: found its process %d running untracked: taking it over", h.name, pid)
        try:
            self.store.set_runtime(rec)
        except (sqlite3.Error, OSError) as e:
            log.warning("VM %s: cannot record process %d (%s); it is tracked in memory only", h.name, pid, e)
        try:
            await self._attach(h, rec)
        except (OSError, ManagerError) as e:
            log.warning("VM %s (pid %d) is alive but cannot be attached: %s", h.name, pid, e)
            h.pid, h.start_ticks, h.paths = pid, start_ticks, rec
            h.tasks = [asyncio.create_task(self._watch(h), name=f"watch-{h.name}")]
            self._set_state(h, VmState.RUNNING, f"attach failed: {e}")
        return True

    def _cleanup_files(self, uuid: str) -> None:
        d = self._vm_dir(uuid)
        for p in (d / "qmp.sock", d / "serial.sock"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def command_for(self, h: VmHandle, qmp: Path, serial: Path) -> builtins.list[str]:  # list: the method above
        """The VM's command line.  Socket paths are given relative to the VM's working directory (its
        run directory) and through the uuid's directory, so they fit AF_UNIX's 108 bytes however deep
        the state directory is, and the uuid appears on the command line to identify the process."""
        d = h.definition
        qmp = Path("..", h.uuid, qmp.name)
        serial = Path("..", h.uuid, serial.name)
        cmd = [*self.config.pyvmm_command, "--accel", d.accel, "--kernel", d.kernel, "-m", f"{d.memory_mib}M",
               "--smp", str(d.vcpus), "--serial", f"unix:{serial},server=on,wait=on",
               "--qmp", f"unix:{qmp},server=on,wait=off"]
        if self.config.sandbox:
            cmd += ["--sandbox", "on"]
        if d.cmdline:
            cmd.append(f"--append={d.cmdline}")  # "=" form: a command line may start with "-"
        if d.initrd:
            cmd += ["--initrd", d.initrd]
        for disk in d.disks:
            spec = f"file={_escape_opt(disk.path)},format={disk.format},if=virtio"
            spec += ",file.locking=off" if h.incoming_shared_disks else ""  # the source holds them until it stops
            cmd += ["--drive", spec + (",readonly=on" if disk.readonly else "")]
        if h.incoming:
            cmd += ["--incoming", h.incoming]
        for i, net in enumerate(d.networks):
            netdev = f"{net.type},id=net{i}" + (f",ifname={net.tap}" if net.type == "tap" and net.tap else "")
            nic = f"virtio-net-pci,netdev=net{i}" + (f",mac={net.mac}" if net.mac else "")
            cmd += ["--netdev", netdev, "--device", nic]
        return cmd

    async def _spawn(self, h: VmHandle) -> None:
        vmdir = self._vm_dir(h.uuid)
        qmp, serial, logf = vmdir / "qmp.sock", vmdir / "serial.sock", vmdir / "vm.log"
        try:
            vmdir.mkdir(mode=0o700, exist_ok=True)
            self._cleanup_files(h.uuid)
            lock_fd = vmlock.try_lock(vmdir)
        except OSError as e:
            raise ManagerError(*status_and_message(e, f"VM {h.name}: cannot prepare {vmdir}")) from None
        if lock_fd is None:
            raise ManagerError(409, f"VM {h.name}: another process holds {vmdir / vmlock.LOCK_NAME}")
        kwargs: dict[str, Any] = {}
        try:
            if self._run_as is not None:
                uid, gid, extra = self._run_as
                os.chown(vmdir, uid, gid)
                kwargs.update(user=uid, group=gid, extra_groups=extra)
            h.scrollback.clear()
            h.history.clear()
            h.cpu = procstats.CpuSampler()
            h.destroying = False
            h.last_shutdown_cause = ""
            h.exited = asyncio.Event()
            cmd = self.command_for(h, qmp, serial)
            log.info("starting VM %s: %s", h.name, " ".join(cmd))
            relay, out = self._start_log_relay(h, vmdir, logf, kwargs)
            try:
                # The VM lock goes to the VM process and stays held exactly as long as it lives.
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=vmdir,
                                        env=clean_environment(), close_fds=True, pass_fds=(lock_fd,),
                                        start_new_session=True, **kwargs)
            except OSError as e:
                raise ManagerError(409, f"VM {h.name}: cannot run {cmd[0]}: {e.strerror}") from None
            finally:
                os.close(out)  # the relay ends when the VM's side of the pipe is closed
        finally:
            os.close(lock_fd)
        h.relay = relay
        st = procstats.read_stat(proc.pid)
        rec = RuntimeRecord(uuid=h.uuid, pid=proc.pid, start_ticks=st.start_ticks if st else 0,
                            qmp_path=str(qmp), serial_path=str(serial), log_path=str(logf), started=time.time())
        try:
            self.store.set_runtime(rec)  # before anything can fail: a dying daemon can still find the VM
        except (sqlite3.Error, OSError) as e:
            # A VM process no record names must not run: a later daemon could not know it is this VM's.
            self._kill_pid(proc.pid)
            await asyncio.to_thread(proc.wait)
            status, message = status_and_message(e, "cannot record its process")
            h.reason = message
            raise ManagerError(status, f"VM {h.name} failed to start: {message}; the process was stopped") \
                from None
        h.proc = proc
        deadline = time.monotonic() + self.config.start_timeout

        async def wait_for_socket(path: Path) -> None:
            while not path.exists():
                if proc.poll() is not None:
                    await self._log_written(h)
                    raise ManagerError(409, failure_line(_read_tail(logf)))
                if time.monotonic() > deadline:
                    raise ManagerError(409, f"no {path.name} after {self.config.start_timeout:.0f}s")
                await asyncio.sleep(0.01)

        try:
            # The serial port is a wait=on server: the VM process waits in its constructor, before the
            # machine powers on, until we connect, so not a byte of the boot is lost.  (Polling for the
            # socket and racing the guest lost a fast guest's first line.)  QMP comes up after that.
            await wait_for_socket(serial)
            await self._attach(h, rec, before_qmp=lambda: wait_for_socket(qmp))
        except (OSError, ManagerError) as e:
            await self._detach(h)
            # A process that failed at once may close its sockets before it exits: give it a moment, so
            # the reason is its own error line rather than "connection refused".
            for _ in range(50):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            exited = proc.returncode not in (None, 0)
            self._kill_pid(proc.pid)
            proc.wait()
            self._forget_runtime(h.uuid)
            h.proc = None
            h.pid = None
            if exited:
                await self._log_written(h)
                h.reason = failure_line(_read_tail(logf))
            else:
                h.reason = e.message if isinstance(e, ManagerError) else f"cannot connect to the VM process: {e}"
            raise ManagerError(409, f"VM {h.name} failed to start: {h.reason}") from None

    def _start_log_relay(self, h: VmHandle, vmdir: Path, logf: Path,
                         kwargs: dict[str, Any]) -> tuple[subprocess.Popen, int]:
        """Start the relay that writes the VM's capped, rotated vm.log; returns it and the pipe's write end
        (the VM's stdout and stderr).  It runs in its own session, like the VM, so it outlives the daemon."""
        # The run directory belongs to the VM user when vm_user is set: never follow a link planted there.
        try:
            log_fd = _create_private_file(logf)
        except OSError as e:
            raise ManagerError(*status_and_message(e, f"VM {h.name}: cannot create {logf}")) from None
        with contextlib.suppress(FileNotFoundError):
            (vmdir / (logf.name + ".1")).unlink()
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            # The relay's command line names the log relative to its working directory: it does not carry
            # the VM's uuid, which identifies the VM process itself.
            relay = subprocess.Popen([*self.config.log_relay_command, logf.name, "--max-bytes",
                                      str(self.config.max_log_bytes)], stdin=r, stdout=log_fd,
                                     stderr=subprocess.DEVNULL, cwd=vmdir, env=clean_environment(), close_fds=True,
                                     start_new_session=True, **kwargs)
        except OSError as e:
            os.close(w)
            raise ManagerError(409, f"VM {h.name}: cannot run its log relay: {e.strerror}") from None
        finally:
            os.close(r)
            os.close(log_fd)
        self._relays.append(relay)
        return relay, w

    @staticmethod
    async def _log_written(h: VmHandle, timeout: float = 2.0) -> None:
        """Wait (a little) for the log relay of an exited VM to write the VM's last lines."""
        deadline = time.monotonic() + timeout
        while h.relay is not None and h.relay.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _attach(self, h: VmHandle, rec: RuntimeRecord,
                      before_qmp: Callable[[], Awaitable[None]] | None = None) -> None:
        """Connect the serial port and QMP of a live VM process and start watching it."""
        h.pid, h.start_ticks, h.paths = rec.pid, rec.start_ticks, rec
        h.exited.clear()
        dirfd = os.open(os.path.dirname(rec.qmp_path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            qmp_path, serial_path = (_short_path(p, dirfd) for p in (rec.qmp_path, rec.serial_path))
            reader, writer = await _connect_unix(serial_path)
            h.serial_writer = writer
            h.tasks = [asyncio.create_task(self._serial_reader(h, reader), name=f"serial-{h.name}")]
            if before_qmp is not None:
                await before_qmp()
            client = QMPClient(f"pyvmmd-{h.name}")
            try:
                await self._connect_qmp(client, qmp_path)
                status = await self._settled_status(client)
            except Exception as e:
                with contextlib.suppress(Exception):
                    await client.disconnect()
                await self._detach(h)
                h.pid = None
                raise ManagerError(409, f"QMP on {rec.qmp_path}: {e}") from None
        finally:
            os.close(dirfd)
        h.qmp = client
        h.id, self._next_id = self._next_id, self._next_id + 1
        accel = accelerator_from_log(_read_tail(Path(rec.log_path), 1 << 20) if rec.log_path else "")
        h.accelerator, h.accelerator_reason = accel if accel else (None, "")
        if status.get("running"):
            self._set_state(h, VmState.RUNNING, "")
        elif status.get("status") == "shutdown":
            self._set_state(h, VmState.SHUTTING_DOWN, "")
        else:
            self._set_state(h, VmState.PAUSED, str(status.get("status", "")))
        h.tasks += [asyncio.create_task(self._qmp_events(h, client), name=f"qmp-{h.name}"),
                    asyncio.create_task(self._watch(h), name=f"watch-{h.name}")]

    @staticmethod
    async def _connect_qmp(client: QMPClient, path: str, timeout: float = 5.0) -> None:
        """Connect QMP, retrying while its socket is bound but not yet listening (as _connect_unix)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.wait_for(client.connect(path), max(0.1, deadline - time.monotonic()))
                return
            except ConnectError as e:
                if not isinstance(e.exc, ConnectionRefusedError) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.02)

    @staticmethod
    async def _settled_status(client: QMPClient, timeout: float = 10.0) -> dict:
        """query-status, waiting out "prelaunch": QMP is served before the machine powers on, and the
        power-on (unlike a later ``cont``) sends no RESUME event to learn it from."""
        deadline = time.monotonic() + timeout
        while True:
            status = await asyncio.wait_for(client.execute("query-status"), 5.0)
            if not isinstance(status, dict):
                raise ManagerError(409, f"query-status returned {status!r}")
            if status.get("status") != "prelaunch" or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.02)

    async def _detach(self, h: VmHandle) -> None:
        for t in h.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        h.tasks = []
        if h.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(h.qmp.disconnect(), 2.0)
            h.qmp = None
        if h.serial_writer is not None:
            h.serial_writer.close()
            h.serial_writer = None

    async def _qmp_events(self, h: VmHandle, client: QMPClient) -> None:
        async for ev in client.events:
            name = ev.get("event")
            if name == "STOP":
                if h.state != VmState.SHUTTING_DOWN:
                    self._set_state(h, VmState.PAUSED, "paused")
            elif name == "RESUME":
                if h.state != VmState.RUNNING:  # a resume this daemon asked for has set the state already
                    self._set_state(h, VmState.RUNNING, "resumed")
            elif name == "SHUTDOWN":
                # qemu.qmp types a Message's values as object; an event's "data" is a JSON object
                h.last_shutdown_cause = str(cast(dict[str, Any], ev.get("data", {})).get("reason", ""))
                self._set_state(h, VmState.SHUTTING_DOWN, h.last_shutdown_cause)
            elif name == "RESET":
                self._publish(h, "reset")

    async def _serial_reader(self, h: VmHandle, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(4096)
            if not data:
                return
            h.add_output(data)

    async def _watch(self, h: VmHandle) -> None:
        """Poll the process until it is gone, then record how it ended."""
        while self._alive(h):
            await asyncio.sleep(0.1)
        status = h.proc.returncode if h.proc is not None else None
        if h.destroying:
            state, reason = VmState.SHUTOFF, "destroyed"
        elif status not in (0, None):
            state, reason = VmState.CRASHED, f"exited with status {status}"
        else:
            state, reason = VmState.SHUTOFF, h.last_shutdown_cause or "shut down"
        log.info("VM %s ended: %s", h.name, reason)
        await self._detach(h)
        self._forget_runtime(h.uuid)
        self._cleanup_files(h.uuid)
        h.pid, h.proc, h.relay, h.paths, h.id = None, None, None, None, None
        h.accelerator, h.accelerator_reason = None, ""
        self._set_state(h, state, reason)
        h.exited.set()

    def _alive(self, h: VmHandle) -> bool:
        if h.proc is not None:
            return h.proc.poll() is None  # also reaps our own child
        return h.pid is not None and procstats.is_vm_process(h.pid, h.start_ticks, h.uuid)

    async def _wait_exit(self, h: VmHandle, timeout: float) -> bool:
        if not h.active:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(h.exited.wait(), timeout)
        return not h.active

    def _kill(self, h: VmHandle) -> None:
        if h.pid is not None and (h.proc is not None or procstats.is_vm_process(h.pid, h.start_ticks, h.uuid)):
            self._kill_pid(h.pid)

    @staticmethod
    def _kill_pid(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    async def _sample_stats(self) -> None:
        while True:
            self._relays = [r for r in self._relays if r.poll() is None]  # reap the relays of ended VMs
            now = time.time()
            for h in list(self.vms.values()):
                if h.pid is None:
                    continue
                st = procstats.read_stat(h.pid)
                rss = procstats.read_rss_bytes(h.pid)
                if st is None or rss is None:
                    continue
                h.history.append(VmStats(timestamp=now, cpu_time_s=st.cpu_time_s,
                                         cpu_percent=h.cpu.sample(now, st.cpu_time_s), rss_bytes=rss,
                                         memory_mib=h.definition.memory_mib))
            await asyncio.sleep(self.config.stats_interval)

