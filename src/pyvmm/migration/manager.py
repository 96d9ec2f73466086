"""One machine's migration bookkeeping: capabilities, parameters, the current outgoing job and
the incoming side, with QEMU's rules and error texts.  QMP (monitor/migration_commands.py)
drives it; the machine supplies a :class:`~pyvmm.migration.outgoing.Source`."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.migration import mapped_target as mapped_mod
from pyvmm.migration import uri as uri_mod
from pyvmm.migration.outgoing import OutgoingMigration, Source
from pyvmm.migration.status import MigrationStatus, Params

log = logging.getLogger(__name__)

#: The capabilities ``query-migrate-capabilities`` lists; only ``events`` changes anything.
CAPABILITIES = ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
                "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
                "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
                "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt", "mapped-ram")
#: ``events``: MIGRATION/MIGRATION_PASS events; ``mapped-ram`` (with ``file:``): RAM at fixed file offsets,
#: so a restore maps it lazily (vmstate/mapped.py).
SUPPORTED = frozenset({"events", "mapped-ram"})
MAX_DOWNTIME_MS = 2_000_000     # QEMU: MAX_MIGRATE_DOWNTIME_SECONDS * 1000
ACTIVE = ("setup", "active", "device", "cancelling")


class MigrationError(PyvmmError):
    """A refused QMP migration command (the message is QEMU's where QEMU has one)."""


class MigrationManager:
    def __init__(self, source: Source, *, incoming: str | None = None,
                 emit: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.source = source
        self.capabilities = dict.fromkeys(CAPABILITIES, False)
        self.params = Params()
        self.status = MigrationStatus()
        self.incoming = incoming            # -incoming URI or "defer"
        self.incoming_uri: str | None = None if incoming == "defer" else incoming
        self.incoming_started = threading.Event()
        if self.incoming_uri is not None:
            self.incoming_started.set()
        self._emit = emit
        self._job: OutgoingMigration | None = None
        self.fds: dict[str, int] = {}

    def event(self, name: str, data: dict[str, Any]) -> None:
        if self.capabilities["events"] and self._emit is not None:
            self._emit(name, data)

    # -- QMP ------------------------------------------------------------------------------------
    def migrate(self, uri: str, inmigrate: bool) -> None:
        if inmigrate:
            raise MigrationError("Guest is waiting for an incoming migration")
        if self.status.status in ACTIVE:
            raise MigrationError("There's a migration process in progress")
        try:
            parsed = uri_mod.parse(uri)
        except ConfigError as e:
            raise MigrationError(str(e)) from None
        _check_sandbox(parsed)
        fds = None
        if parsed.scheme == "fd" and not parsed.target.isdigit():
            fd = self.take_fd(parsed.target)
            if fd is None:
                raise MigrationError(f"File descriptor named '{parsed.target}' has not been found")
            fds = {parsed.target: fd}
        try:
            self.source.check_savable()   # a device that cannot be saved: refused before anything starts
        except BaseException:
            self._close_all(fds)
            raise
        mapped = self.capabilities["mapped-ram"]
        if mapped:
            fds = self._mapped_target(parsed, fds)
        self._job = OutgoingMigration(self.source, parsed, self.status, self.params, self.event, fds, mapped=mapped)
        self._job.start()

    def _mapped_target(self, parsed: uri_mod.MigrationUri, fds: dict[str, int] | None) -> dict[str, int] | None:
        """``mapped-ram`` writes at fixed offsets: ``file:PATH``, ``file:/dev/fdset/N`` (a writable member of
        an ``add-fd`` set) or ``fd:NAME`` naming a regular file (QEMU lets ``fd:`` through and refuses a
        socket or pipe later).  Returns the descriptors the job owns."""
        if parsed.scheme not in ("file", "fd"):
            self._close_all(fds)
            raise MigrationError("Mapped-ram migration requires a file: URI")
        if parsed.scheme == "file" and not parsed.target.startswith(mapped_mod.FDSET_PREFIX):
            return fds
        try:
            if parsed.scheme == "file":
                fd = mapped_mod.fdset_writable(parsed.target)
                fds = {parsed.target: fd}
            else:
                fd = uri_mod.fd_of(parsed.target, fds)
            mapped_mod.check_seekable(fd)
        except OSError as e:
            if parsed.scheme == "file" or not parsed.target.isdigit():
                self._close_all(fds)
            raise MigrationError(e.strerror or str(e)) from None
        return fds

    @staticmethod
    def _close_all(fds: dict[str, int] | None) -> None:
        for fd in (fds or {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def take_fd(self, name: str) -> int | None:
        """A descriptor a monitor client passed with ``getfd`` (kept in :attr:`fds`, or by the
        monitor's fd-passing module if it has a ``take_fd(name)``); the migration owns it now."""
        if name in self.fds:
            return self.fds.pop(name)
        import importlib

        try:
            fdpass = importlib.import_module("pyvmm.monitor.fdpass")
        except ImportError:
            return None
        take = getattr(fdpass, "take_fd", None)
        fd = take(name) if callable(take) else None
        return fd if isinstance(fd, int) else None

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def query(self) -> dict[str, Any]:
        return self.status.query()

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": c, "state": v} for c, v in self.capabilities.items()]

    def set_capabilities(self, caps: list[Any]) -> None:
        if self.status.status in ACTIVE:
            raise MigrationError("There's a migration process in progress")
        wanted = {}
        for item in caps:
            if not isinstance(item, dict):
                raise MigrationError("Invalid parameter type for 'capabilities[0]', expected: object")
            cap, state = item.get("capability"), item.get("state")
            if cap is None:
                raise MigrationError("Parameter 'capability' is missing")
            if state is None:
                raise MigrationError("Parameter 'state' is missing")
            if cap not in self.capabilities:
                raise MigrationError(f"Parameter 'capability' does not accept value '{cap}'")
            if not isinstance(state, bool):
                raise MigrationError("Invalid parameter type for 'state', expected: boolean")
            if state and cap not in SUPPORTED:
                raise MigrationError(f"pyvmm cannot honour migration capability '{cap}'")
            wanted[cap] = state
        self.capabilities.update(wanted)

    def set_parameters(self, args: dict[str, Any]) -> None:
        if "downtime-limit" in args:
            v = args["downtime-limit"]
            if not isinstance(v, int) or isinstance(v, bool):
                raise MigrationError("Invalid parameter type for 'downtime-limit', expected: integer")
            if not 0 <= v <= MAX_DOWNTIME_MS:
                raise MigrationError("Parameter 'downtime_limit' expects an integer in the range of 0 to "
                                     f"{MAX_DOWNTIME_MS // 1000} seconds")
        if "max-bandwidth" in args:
            v = args["max-bandwidth"]
            if not isinstance(v, int) or isinstance(v, bool):
                raise MigrationError("Invalid parameter type for 'max-bandwidth', expected: integer")
            if not 0 <= v <= (1 << 63) - 1:
                raise MigrationError("Parameter 'max_bandwidth' expects an integer in the range of 0 to "
                                     "9223372036854775807 bytes/second")
        if "downtime-limit" in args:
            self.params.downtime_limit_ms = args["downtime-limit"]
        if "max-bandwidth" in args:
            self.params.max_bandwidth = args["max-bandwidth"]

    def start_incoming(self, uri: str) -> None:
        """``migrate-incoming`` (needs ``-incoming defer``)."""
        if self.incoming is None:
            raise MigrationError("'-incoming' was not specified on the command line")
        if self.incoming_started.is_set():
            raise MigrationError("The incoming migration has already been started")
        try:
            parsed = uri_mod.parse(uri)
        except ConfigError as e:
            raise MigrationError(str(e)) from None
        _check_sandbox(parsed)
        if parsed.scheme == "fd" and not parsed.target.isdigit():
            fd = self.take_fd(parsed.target)
            if fd is None:
                raise MigrationError(f"File descriptor named '{parsed.target}' has not been found")
            self.fds[parsed.target] = fd
        self.incoming_uri = uri
        self.announce_incoming()  # before the command's reply, as QEMU: libvirt waits for this event
        self.incoming_started.set()

    def announce_incoming(self) -> None:
        """The incoming migration is set up: status ``setup`` and its MIGRATION event (once)."""
        if self.status.status == "setup":
            return
        self.status.begin()
        self.status.status = "setup"
        self.event("MIGRATION", {"status": "setup"})


def _check_sandbox(parsed: uri_mod.MigrationUri) -> None:
    """Under ``-sandbox on`` a new socket or program would kill the VMM: refuse the command instead."""
    from pyvmm import sandbox

    why = sandbox.refusal(needs_socket=parsed.scheme in ("unix", "tcp"), needs_spawn=parsed.scheme == "exec")
    if why is not None:
        raise MigrationError(f"{parsed.scheme}: migration: {why}")
