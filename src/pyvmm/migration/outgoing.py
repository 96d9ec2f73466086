"""The source side of a migration: QEMU's pre-copy, run in its own thread.

1. ``setup``: the channel opens (``exec:`` starts its command, ``tcp:``/``unix:`` connect).
2. ``active``: the header, then RAM.  A running guest keeps running: the first pass sends all
   RAM, and each further pass sends what changed since (:class:`pyvmm.vmstate.ram.RamSender`),
   until what is left would take no longer than ``downtime-limit`` at the bandwidth measured
   in the last pass.  ``max-bandwidth`` throttles these passes, as in QEMU.
3. ``device``: the vCPUs stop (run state ``finish-migrate``), the devices are quiesced, and
   the last changed pages and every device section go unthrottled.  The time from the stop
   to the last byte is the downtime.
4. ``completed``: the source stays stopped in ``postmigrate``.  On any error (the destination
   died, the command failed) the status is ``failed`` and a guest that was running runs on;
   ``migrate_cancel`` ends in ``cancelled`` the same way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from pyvmm.memory import GuestMemory
from pyvmm.migration.status import MigrationStatus, Params
from pyvmm.migration.uri import MigrationUri, OutChannel
from pyvmm.vmstate import VmStateError
from pyvmm.vmstate.ram import PAGE, PassStats, RamSender
from pyvmm.vmstate.stream import StreamWriter

log = logging.getLogger(__name__)

#: Passes after which the source stops and sends the rest whatever is left (QEMU iterates on;
#: a guest dirtying faster than the link forever would otherwise never finish).
MAX_PASSES = 60


class DirtyLog(Protocol):
    def dirty_log_start(self) -> None: ...

    def dirty_log_sync(self) -> list[tuple[int, int]]: ...

    def dirty_log_stop(self) -> None: ...


class Source(Protocol):
    """What the source machine does for a migration (PcMachine through machine/pc_migration.py)."""

    memory: GuestMemory

    def migration_header(self) -> dict[str, Any]: ...

    def migration_dirty_log(self) -> DirtyLog | None:
        """The accelerator's dirty log (KVM), or None: then every pass compares all RAM."""
        ...

    def check_savable(self) -> None:
        """Raise VmStateError if some device cannot be migrated."""
        ...

    def migration_running(self) -> bool: ...

    def migration_stop(self) -> None:
        """Stop the vCPUs for the last pass (run state finish-migrate)."""
        ...

    def migration_quiesced(self) -> AbstractContextManager[None]: ...

    def migration_write_devices(self, w: StreamWriter) -> None: ...

    def migration_completed(self) -> None:
        """Run state postmigrate."""
        ...

    def migration_failed(self, resume: bool) -> None:
        """Back to running if ``resume`` (the guest ran before), else stay paused."""
        ...


class OutgoingMigration:
    def __init__(self, source: Source, uri: MigrationUri, status: MigrationStatus, params: Params,
                 on_event: Callable[[str, dict[str, Any]], None], fds: dict[str, int] | None = None, *,
                 mapped: bool = False) -> None:
        self.source = source
        self.uri = uri
        self.status = status
        self.params = params
        self._on_event = on_event
        self._fds = fds
        self._mapped = mapped
        self._cancel = threading.Event()
        self._channel: OutChannel | None = None
        self._log: DirtyLog | None = None
        self.thread = threading.Thread(target=self._run, name="migration", daemon=True)

    def start(self) -> None:
        self.status.begin()
        self._set("setup")
        self.thread.start()

    def cancel(self) -> None:
        if self.status.status in ("setup", "active", "device"):
            self._cancel.set()
            self._set("cancelling")
            ch = self._channel
            if ch is not None:
                ch.abort()   # unblocks a write to a slow destination

    # -- the job ---------------------------------------------------------------------------------
    def _set(self, status: str) -> None:
        self.status.status = status
        self._on_event("MIGRATION", {"status": status})

    def _run(self) -> None:
        src = self.source
        was_running = src.migration_running()
        stopped = False
        if self._mapped:
            self._run_mapped(was_running)
            return
        try:
            self._channel = OutChannel(self.uri, self._fds)
            if self._cancel.is_set():
                raise VmStateError("migration cancelled")
            self.status.setup_done()
            w = StreamWriter(self._channel, max_bandwidth=lambda: self.params.max_bandwidth if not stopped else 0,
                             cancelled=self._cancel.is_set)
            self.status.writer = w
            w.header(src.migration_header(), runstate="running" if was_running else "paused")
            self._set("active")
            ram = RamSender(src.memory, w, track=was_running)
            self.status.ram_total = ram.total
            if was_running:
                self._log = src.migration_dirty_log()
                if self._log is not None:
                    self._log.dirty_log_start()
                self._precopy(ram)
            self.status.stop_time = time.monotonic()
            if was_running:
                src.migration_stop()
                stopped = True
            self._set("device")
            with src.migration_quiesced():
                st = ram.dirty_pass(self._written()) if was_running else ram.full_pass()
                self._account(st)
                src.migration_write_devices(w)
                w.end()
            ram.release()
            self._channel.finish()
            self._channel = None
            self.status.finish()
            src.migration_completed()
            self._set("completed")
            log.info("migration to %s completed: %d bytes, downtime %d ms", self.uri.text, w.bytes,
                     self.status.downtime_ms)
        except (OSError, VmStateError, ValueError) as e:
            self._fail(e, was_running)
        finally:
            log_, self._log = self._log, None
            if log_ is not None:
                log_.dirty_log_stop()

    def _written(self) -> list[tuple[int, int]] | None:
        return self._log.dirty_log_sync() if self._log is not None else None

    def _run_mapped(self, was_running: bool) -> None:
        """``mapped-ram`` to ``file:PATH``, ``file:/dev/fdset/N`` or ``fd:NAME`` (migration/mapped_target.py):
        records first, then RAM at fixed offsets (vmstate/mapped.py)."""
        import io
        import os

        from pyvmm.migration import mapped_target
        from pyvmm.vmstate import mapped
        from pyvmm.vmstate.stream import END, MAPPED

        src = self.source
        try:
            if was_running:
                raise VmStateError("mapped-ram: pyvmm writes the RAM of a stopped guest only; 'stop' it first")
            self.status.setup_done()
            self._set("active")
            buf = io.BytesIO()
            w = StreamWriter(buf, cancelled=self._cancel.is_set)
            w.header(src.migration_header(), runstate="paused")
            self.status.stop_time = time.monotonic()
            self._set("device")
            with src.migration_quiesced():
                src.migration_write_devices(w)
                regions = src.memory.regions
                record_len = 5 + 24 + 4
                places = mapped.layout(src.memory, w.bytes + record_len * len(regions) + 9)
                for gpa, size, offset in places:
                    w.record(MAPPED, mapped.record(gpa, size, offset))
                w.record(END)
                fd = mapped_target.open_target(self.uri, self._fds)
                self._fds = None  # open_target owns (and the finally below closes) a passed descriptor
                try:
                    os.pwrite(fd, buf.getvalue(), 0)
                    ram = mapped.write_ram(fd, src.memory, places)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self.status.ram_total = sum(r.size for r in regions)
            self.status.ram_normal_bytes = ram
            self.status.writer = w
            w.bytes += ram
            self.status.finish()
            src.migration_completed()
            self._set("completed")
        except (OSError, VmStateError, ValueError) as e:
            self._fail(e, False)
        finally:
            for left in (self._fds or {}).values():  # a passed descriptor the job never got to
                with contextlib.suppress(OSError):
                    os.close(left)
            self._fds = None

    def _fail(self, e: Exception, was_running: bool) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            ch.abort()
        self.status.finish()
        cancelled = self._cancel.is_set()
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        self.status.error = "" if cancelled else text
        self.source.migration_failed(resume=was_running)
        if cancelled:
            log.info("migration to %s cancelled", self.uri.text)
            self._set("cancelled")
        else:
            log.warning("migration to %s failed: %s", self.uri.text, text)
            self._set("failed")

    def _account(self, st: PassStats) -> None:
        s = self.status
        s.ram_normal_bytes += st.dirty_bytes
        s.ram_duplicate += st.zero_bytes // PAGE
        s.passes += 1

    def _precopy(self, ram: RamSender) -> None:
        """Passes until the last one took no longer than ``downtime-limit``: the last pass, with the
        vCPUs stopped, scans the same RAM and sends about as much, unthrottled."""
        s = self.status
        st = ram.full_pass()
        self._account(st)
        s.remaining = ram.total
        for _pass in self._passes():
            t0 = time.monotonic()
            st = ram.dirty_pass(self._written())
            elapsed = max(time.monotonic() - t0, 1e-3)
            self._account(st)
            s.dirty_pages_rate = int(st.dirty_bytes / PAGE / elapsed)
            s.remaining = st.dirty_bytes
            s.expected_downtime_ms = int(1000 * elapsed)
            self._on_event("MIGRATION_PASS", {"pass": s.passes})
            if s.expected_downtime_ms <= self.params.downtime_limit_ms:
                return

    def _passes(self) -> Iterator[int]:
        for i in range(MAX_PASSES):
            if self._cancel.is_set():
                raise VmStateError("migration cancelled")
            yield i
