"""The QMP server: sockets, sessions and message dispatch.

One asyncio event loop runs in a dedicated ``monitor`` thread and serves
every ``--qmp`` socket.  Each connection is a session: it gets the greeting,
must send ``qmp_capabilities`` before anything else, and receives events once
negotiated.  Commands run on the monitor thread, one at a time, in arrival
order; state-changing ones only touch the machine through
:class:`~pyvmm.monitor.control.MachineControl`.

A client cannot hurt the VMM: input is split by
:class:`~pyvmm.monitor.jsonstream.JsonStream` (bounded, resynchronising),
every malformed message gets a QMP error, a failing handler becomes a
GenericError, and a client that stops reading is dropped once its pending
output passes :data:`MAX_OUTPUT_BACKLOG` instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from pyvmm.errors import ConfigError, DeviceError, PyvmmError
from pyvmm.monitor import commands, fdpass
from pyvmm.monitor.control import ChardevInfo, MachineControl
from pyvmm.monitor.errors import QmpError
from pyvmm.monitor.events import ShutdownCause, StateTracker, cause_of, guest_panic_event, reset_event
from pyvmm.monitor.jsonstream import JsonStream, Message, ParseError
from pyvmm.qemuopts import split_escaped
from pyvmm.runstate import GuestPanic, RunState

log = logging.getLogger(__name__)

#: Bytes read from a socket per call.
READ_CHUNK = 64 * 1024
#: A client whose unread output exceeds this is disconnected.
MAX_OUTPUT_BACKLOG = 16 << 20
#: How long shutdown waits, at most, for clients to take their last messages.  Output waits
#: only for a client that is not reading (the kernel's socket buffer is full): it is cut off
#: after this, so one stuck client never delays ``quit``.
FLUSH_TIMEOUT = 0.5
#: Members a command message may have (QEMU also knows exec-oob, which needs the oob capability).
_MESSAGE_MEMBERS = frozenset({"execute", "arguments", "id"})


@dataclass(frozen=True)
class MonitorSpec:
    """A ``--qmp`` option: ``unix:PATH[,server=on][,wait=off]`` or ``tcp:HOST:PORT[,...]``."""

    kind: str                 # "unix", "tcp", or "fd" (a listening socket inherited from the parent)
    path: str = ""
    fd: int = -1
    host: str = ""
    port: int = 0
    wait: bool = True

    @classmethod
    def parse(cls, text: str) -> MonitorSpec:
        head, *opts = split_escaped(text)  # ",," is a comma in PATH, as QEMU reads it
        server, wait = False, True
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "server":
                server = _flag(value or "on", text)
            elif key == "wait":
                wait = _flag(value or "on", text)
            elif key == "nowait" and not value:
                wait = False
            else:
                raise ConfigError(f"--qmp {text}: unknown option {opt!r}")
        if not server:
            raise ConfigError(f"--qmp {text}: only listening sockets are supported, add ',server=on'")
        if head.startswith("fd:") and head[3:].isdigit():
            return cls("fd", fd=int(head[3:]), wait=wait)
        if head.startswith("unix:") and len(head) > 5:
            return cls("unix", path=head[5:], wait=wait)
        if head.startswith("tcp:"):
            host, sep, port = head[4:].rpartition(":")
            if sep and port.isdigit() and int(port) < 65536:
                return cls("tcp", host=host or "localhost", port=int(port), wait=wait)
        raise ConfigError(f"--qmp {text}: expected unix:PATH or tcp:HOST:PORT, with ,server=on[,wait=off]")

    def describe(self) -> str:
        if self.kind == "fd":
            return f"fd:{self.fd},server=on"
        where = f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"
        return f"{where},server=on"


def _flag(value: str, text: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise ConfigError(f"--qmp {text}: {value!r} is not on/off")


def _listen(spec: MonitorSpec) -> socket.socket:
    """Bind and listen now, on the caller's thread, so errors surface before the VM starts."""
    try:
        if spec.kind == "fd":
            return _inherited_listener(spec.fd)
        if spec.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(spec.path).st_mode):
                    os.unlink(spec.path)  # a stale socket from an earlier run, as QEMU does
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(spec.path)
        else:
            infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        sock.listen(8)
        sock.setblocking(False)
        return sock
    except OSError as e:
        raise DeviceError(f"--qmp {spec.describe()}: cannot listen: {e.strerror or e}") from None


def _inherited_listener(fd: int) -> socket.socket:
    """The listening stream socket the parent passed as ``fd`` (libvirt binds the monitor socket itself)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise DeviceError(f"fd {fd}: not a socket: {e.strerror or e}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise DeviceError(f"fd {fd}: not a listening stream socket")
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


@dataclass(eq=False)
class _Session:
    """One connected client."""

    writer: asyncio.StreamWriter
    label: str
    negotiated: bool = False
    closed: bool = False
    task: asyncio.Task[None] | None = None
    #: Descriptors the client passed with SCM_RIGHTS (unix sockets only), for getfd/add-fd.
    passed_fds: fdpass.PassedFds | None = None

    def send(self, msg: Mapping[str, Any]) -> None:
        if self.closed or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_OUTPUT_BACKLOG:
            log.warning("qmp %s: client is not reading its replies; disconnecting it", self.label)
            self.close()
            return
        self.writer.write(json.dumps(msg).encode() + b"\r\n")

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    def abort(self) -> None:
        """Drop the connection and whatever output it has not taken."""
        self.closed = True
        self.writer.transport.abort()


@dataclass(eq=False)
class _Context:
    """What a command handler sees (implements :class:`commands.CommandContext`)."""

    server: MonitorServer
    session: _Session
    machine: MachineControl = field(init=False)

    def __post_init__(self) -> None:
        self.machine = self.server.machine

    def broadcast(self, event: dict[str, Any]) -> None:
        self.server.broadcast(event)

    def monitor_chardevs(self) -> list[ChardevInfo]:
        return self.server.chardevs()


class MonitorServer:
    """Serves QMP on the given sockets for one machine.  Also a :class:`MachineObserver`."""

    def __init__(self, machine: MachineControl, specs: list[MonitorSpec]) -> None:
        self.machine = machine
        self.specs = list(specs)
        self._socks: list[socket.socket] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._sessions: set[_Session] = set()
        self._tracker = StateTracker()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connected = [threading.Event() for _ in self.specs]
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._closed = False
        self._accept_tasks: set[asyncio.Task[None]] = set()

    # -- life cycle (machine's main thread) ---------------------------------------------------
    def start(self) -> None:
        """Listen on every socket and start the monitor thread."""
        try:
            for spec in self.specs:
                self._socks.append(_listen(spec))
        except DeviceError:
            self._close_sockets()
            raise
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._close_sockets()
            raise DeviceError(f"QMP monitor failed to start: {self._start_error}")
        for spec in self.specs:
            log.info("QMP monitor listening on %s", spec.describe())

    def wait_for_clients(self) -> None:
        """Block until each ``wait=on`` socket has had a client (QEMU's default for servers)."""
        for spec, connected in zip(self.specs, self._connected, strict=True):
            if spec.wait and not connected.is_set():
                log.info("QMP: waiting for a connection on %s", spec.describe())
                connected.wait()

    def close(self) -> None:
        """Deliver what is queued (e.g. the SHUTDOWN event), disconnect everyone, stop the thread."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            fut = asyncio.run_coroutine_threadsafe(self._aclose(), loop)
            with contextlib.suppress(FutureTimeout):
                fut.result(FLUSH_TIMEOUT + 1.0)
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # the loop already stopped
            pass
        thread.join(FLUSH_TIMEOUT + 1.0)
        if not thread.is_alive():
            loop.close()
        self._remove_socket_files()
        for i in range(len(self.specs)):
            fdpass.close_monitor(f"compat_monitor{i}")

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start_servers())
        except Exception as e:  # reported by start() on the machine's thread
            self._start_error = e
            self._loop.close()
            return
        finally:
            self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.sleep(0))

    async def _start_servers(self) -> None:
        for i, sock in enumerate(self._socks):
            on_client = functools.partial(self._serve, i)  # asyncio runs (and keeps) one task per client
            if sock.family == socket.AF_UNIX:  # accepted here, so reads can carry SCM_RIGHTS descriptors
                task = asyncio.ensure_future(self._accept_unix(i, sock))
                self._accept_tasks.add(task)
                task.add_done_callback(self._accept_tasks.discard)
            else:
                self._servers.append(await asyncio.start_server(on_client, sock=sock, limit=READ_CHUNK))

    async def _accept_unix(self, index: int, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:
                if listener.fileno() < 0:
                    return
                log.warning("qmp compat_monitor%d: accept failed: %s", index, e)
                await asyncio.sleep(0.1)
                continue
            sock = fdpass.FdSocket.adopt(conn)
            sock.setblocking(False)
            reader = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_accepted_socket(functools.partial(lambda p: p, protocol), sock=sock)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            task = asyncio.ensure_future(self._serve(index, reader, writer, sock.passed))
            self._accept_tasks.add(task)
            task.add_done_callback(self._accept_tasks.discard)

    async def _aclose(self) -> None:
        """Flush every client at once for at most FLUSH_TIMEOUT, cut off the rest, end their tasks."""
        for srv in self._servers:
            srv.close()
        for task in list(self._accept_tasks):
            if not any(s.task is task for s in self._sessions):
                task.cancel()  # the unix accept loops
        sessions = list(self._sessions)

        async def flush(s: _Session) -> None:
            with contextlib.suppress(Exception):
                await s.writer.drain()

        if sessions:
            await asyncio.wait([asyncio.ensure_future(flush(s)) for s in sessions], timeout=FLUSH_TIMEOUT)
        for s in sessions:
            if s.writer.transport.get_write_buffer_size():
                log.debug("qmp %s: client did not take its last replies; dropping them", s.label)
                s.abort()  # a client that is not reading: closing would wait for it
            else:
                s.close()
        tasks = [s.task for s in sessions if s.task is not None and not s.task.done()]
        if tasks:  # each session's task sees its connection end and returns by itself
            await asyncio.wait(tasks, timeout=FLUSH_TIMEOUT)

    def _close_sockets(self) -> None:
        for sock in self._socks:
            sock.close()
        self._remove_socket_files()

    def _remove_socket_files(self) -> None:
        for spec in self.specs:
            if spec.kind == "unix":
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(spec.path).st_mode):
                        os.unlink(spec.path)

    # -- machine notifications (any thread) -----------------------------------------------------
    def on_state(self, state: RunState, reason: str) -> None:
        def emit() -> None:
            for ev in self._tracker.events_for(state, reason):
                self.broadcast(ev)

        self._post(emit)

    def on_reset(self, reason: str) -> None:
        self._post(lambda: self.broadcast(reset_event(cause_of(reason, ShutdownCause.GUEST_RESET))))

    def on_guest_panic(self, report: GuestPanic) -> None:
        self._post(lambda: self.broadcast(guest_panic_event(report)))

    def emit(self, event: Mapping[str, Any]) -> None:
        """Send ``event`` to every negotiated client, from any thread (e.g. a migration's).  From a
        command handler (the monitor thread) it goes out at once, before the command's reply."""
        if self._thread is not None and threading.current_thread() is self._thread:
            self.broadcast(event)
            return
        self._post(lambda: self.broadcast(event))

    def _post(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # closed between the check and the call
            loop.call_soon_threadsafe(fn)

    # -- monitor thread ------------------------------------------------------------------------
    def broadcast(self, event: Mapping[str, Any]) -> None:
        for s in list(self._sessions):
            if s.negotiated:
                s.send(event)

    def chardevs(self) -> list[ChardevInfo]:
        return [ChardevInfo(f"compat_monitor{i}", spec.describe()) for i, spec in enumerate(self.specs)]

    async def _serve(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     passed_fds: fdpass.PassedFds | None = None) -> None:
        session = _Session(writer, f"compat_monitor{index}", task=asyncio.current_task(), passed_fds=passed_fds)
        self._sessions.add(session)
        self._connected[index].set()
        log.debug("qmp %s: client connected", session.label)
        stream = JsonStream()
        try:
            session.send({"QMP": {"version": commands.version_info(), "capabilities": []}})
            while not session.closed:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                for item in stream.feed(data):
                    self._dispatch(session, item)
                await writer.drain()
        except (ConnectionError, OSError) as e:
            log.debug("qmp %s: connection error: %s", session.label, e)
        except asyncio.CancelledError:
            # The monitor is stopping.  End normally: asyncio's stream server reports a
            # cancelled client task as an "Exception in callback" traceback (Python 3.11).
            log.debug("qmp %s: closed by monitor shutdown", session.label)
        finally:
            self._sessions.discard(session)
            session.close()
            log.debug("qmp %s: client disconnected", session.label)

    def _dispatch(self, session: _Session, item: Message | ParseError) -> None:
        if isinstance(item, ParseError):
            session.send({"error": QmpError(item.desc).to_json()})
            return
        msg = item.value
        reply: dict[str, Any]
        has_id = isinstance(msg, dict) and "id" in msg
        try:
            name, args = _parse_command(msg)
            cmd = commands.lookup(name, session.negotiated)
            cmd.check_args(args)
            reply = {"return": cmd.handler(_Context(self, session), args)}
        except QmpError as e:
            reply = {"error": e.to_json()}
        except PyvmmError as e:  # the machine refused (e.g. no such device): the user's problem, not a bug
            reply = {"error": QmpError(str(e)).to_json()}
        except Exception as e:  # a handler bug must not take the monitor down
            log.exception("qmp: command failed")
            reply = {"error": QmpError(f"internal error: {e}").to_json()}
        if has_id:
            assert isinstance(msg, dict)
            reply["id"] = msg["id"]
        session.send(reply)


def _parse_command(msg: object) -> tuple[str, dict[str, Any]]:
    """Validate a message's shape the way QEMU does; return (command name, arguments)."""
    if not isinstance(msg, dict):
        raise QmpError("QMP input must be a JSON object")
    for key, value in msg.items():
        if key not in _MESSAGE_MEMBERS:
            raise QmpError(f"QMP input member '{key}' is unexpected")
        if key == "execute" and not isinstance(value, str):
            raise QmpError("QMP input member 'execute' must be a string")
        if key == "arguments" and not isinstance(value, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
    if "execute" not in msg:
        raise QmpError("QMP input lacks member 'execute'")
    return msg["execute"], msg.get("arguments", {})
