"""The PC machine's side of migration and save/restore.

:class:`PcMigration` is the :class:`~pyvmm.migration.outgoing.Source` of an outgoing
migration (stop the vCPUs, quiesce devices, write their sections, end in ``postmigrate``)
and runs an incoming one (``-incoming URI``, or ``-incoming defer`` and QMP
``migrate-incoming``): it reads the whole stream into the machine before any vCPU runs.
The destination then runs if the source was running and ``-S`` was not given, as QEMU.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from pyvmm.errors import PyvmmError
from pyvmm.machine import pc_state
from pyvmm.migration import uri as uri_mod
from pyvmm.migration.manager import MigrationManager
from pyvmm.migration.outgoing import DirtyLog
from pyvmm.runstate import RunState
from pyvmm.vmstate import VmStateError
from pyvmm.vmstate.stream import StreamReader, StreamWriter

if TYPE_CHECKING:
    from pyvmm.machine.pc import PcMachine

log = logging.getLogger(__name__)


class PcMigration:
    def __init__(self, machine: PcMachine) -> None:
        self.m = machine
        self.memory = machine.memory
        self.manager = MigrationManager(self, incoming=machine.config.incoming, emit=self._emit)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        mon = self.m.monitor
        if mon is not None:
            from pyvmm.monitor.events import Event, make_event

            mon.emit(make_event(Event(name), data))

    # -- Source --------------------------------------------------------------------------------
    def migration_header(self) -> dict[str, Any]:
        return pc_state.fingerprint(self.m)

    def migration_dirty_log(self) -> DirtyLog | None:
        accel = self.m.accel
        if all(hasattr(accel, n) for n in ("dirty_log_start", "dirty_log_sync", "dirty_log_stop")):
            return accel  # type: ignore[return-value]
        return None

    def migration_running(self) -> bool:
        return self.m.state is RunState.RUNNING

    def migration_stop(self) -> None:
        self.m.accel.pause()
        self.m._set_state(RunState.FINISH_MIGRATE)

    def migration_quiesced(self) -> AbstractContextManager[None]:
        return pc_state.quiesced(self.m)

    def migration_write_devices(self, w: StreamWriter) -> None:
        pc_state.write_devices(self.m, w)

    def migration_completed(self) -> None:
        self.m._set_state(RunState.POSTMIGRATE)

    def migration_failed(self, resume: bool) -> None:
        if resume and self.m.state is RunState.FINISH_MIGRATE:
            self.m.accel.resume()
            self.m._set_state(RunState.RUNNING)

    def check_savable(self) -> None:
        pc_state.check_savable(self.m)

    # -- incoming ------------------------------------------------------------------------------
    _early_channel: uri_mod.InChannel | None = None

    def prepare_incoming(self) -> None:
        """Open ``-incoming URI``'s channel now, before ``-sandbox on`` forbids new listening
        sockets (``-incoming defer`` opens it at ``migrate-incoming``, as QEMU does)."""
        if self.manager.incoming_uri is not None and self._early_channel is None:
            self._early_channel = self._open_incoming()

    def _open_incoming(self) -> uri_mod.InChannel:
        mgr = self.manager
        assert mgr.incoming_uri is not None
        try:
            return uri_mod.InChannel(uri_mod.parse(mgr.incoming_uri), mgr.fds)
        except (OSError, PyvmmError) as e:
            raise PyvmmError(f"-incoming {mgr.incoming_uri}: {getattr(e, 'strerror', None) or e}") from None

    def run_incoming(self) -> bool:
        """Read the stream; True if the destination should start its vCPUs now."""
        mgr = self.manager
        m = self.m
        m._set_state(RunState.INMIGRATE)
        while not mgr.incoming_started.wait(0.2):
            if m.control.pending():
                return False   # quit or another request while waiting for migrate-incoming
        assert mgr.incoming_uri is not None
        status = mgr.status
        mgr.announce_incoming()  # migrate-incoming did already
        t0 = time.monotonic()
        uri = uri_mod.parse(mgr.incoming_uri)
        ch, self._early_channel = self._early_channel, None
        if ch is None:
            ch = self._open_incoming()
        try:
            ch.accept()
            status.status = "active"
            mgr.event("MIGRATION", {"status": "active"})
            res = pc_state.load(m, StreamReader(ch), path=uri.target if uri.scheme == "file" else None)
        except (OSError, VmStateError) as e:
            status.status = "failed"
            status.error = str(e)
            mgr.event("MIGRATION", {"status": "failed"})
            raise PyvmmError(f"load of migration failed: {getattr(e, 'strerror', None) or e}") from None
        finally:
            ch.close()
        pc_state.post_load(m)
        status.finish()
        status.status = "completed"
        mgr.event("MIGRATION", {"status": "completed"})
        log.info("incoming migration: %d bytes of RAM, %d sections in %.3f s", res.ram_bytes, res.sections,
                 time.monotonic() - t0)
        return res.header.get("runstate") == "running" and not m.config.start_paused
