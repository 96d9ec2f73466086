"""Persistent state of the daemon in SQLite: VM definitions and the run-time records of running VMs.

Two tables: ``vms`` (one row per definition, the pydantic model as JSON) and
``runtime`` (one row per VM process the daemon started: pid, its start time in
clock ticks since boot, and the QMP/serial socket paths).  The runtime row is
what lets a restarted daemon find and re-attach to VMs that kept running while
it was down.  Every write is one transaction, so a crash never leaves a half
written definition.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pyvmm.manager.models import VmDefinition

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    definition TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runtime (
    uuid TEXT PRIMARY KEY REFERENCES vms(uuid) ON DELETE CASCADE,
    pid INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,
    qmp_path TEXT NOT NULL,
    serial_path TEXT NOT NULL,
    log_path TEXT NOT NULL,
    started REAL NOT NULL
);
"""


class StoreError(Exception):
    """A store operation violated a constraint (duplicate name or uuid, unknown VM)."""


@dataclass(frozen=True)
class RuntimeRecord:
    uuid: str
    pid: int
    start_ticks: int
    qmp_path: str
    serial_path: str
    log_path: str
    started: float


class Store:
    """A small thread-safe wrapper over one SQLite connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- definitions -----------------------------------------------------------------------
    def add(self, d: VmDefinition) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT INTO vms(uuid, name, definition, created) VALUES (?, ?, ?, ?)",
                                 (str(d.uuid), d.name, d.model_dump_json(), time.time()))
            except sqlite3.IntegrityError:
                raise StoreError(f"a VM named {d.name!r} or with uuid {d.uuid} already exists") from None

    def update(self, d: VmDefinition) -> None:
        with self._lock:
            cur = self._db.execute("UPDATE vms SET definition = ?, name = ? WHERE uuid = ?",
                                   (d.model_dump_json(), d.name, str(d.uuid)))
            if cur.rowcount != 1:
                raise StoreError(f"no VM with uuid {d.uuid}")

    def remove(self, uuid: str) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM runtime WHERE uuid = ?", (uuid,))
                self._db.execute("DELETE FROM vms WHERE uuid = ?", (uuid,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a failed COMMIT (full disk) must not leave the transaction open
                    self._db.execute("ROLLBACK")
                raise

    def all(self) -> list[VmDefinition]:
        with self._lock:
            rows = self._db.execute("SELECT definition FROM vms ORDER BY name").fetchall()
        return [VmDefinition.model_validate(json.loads(r[0])) for r in rows]

    # -- runtime records -------------------------------------------------------------------
    def set_runtime(self, rec: RuntimeRecord) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO runtime VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (rec.uuid, rec.pid, rec.start_ticks, rec.qmp_path, rec.serial_path, rec.log_path,
                              rec.started))

    def clear_runtime(self, uuid: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM runtime WHERE uuid = ?", (uuid,))

    def runtimes(self) -> dict[str, RuntimeRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM runtime").fetchall()
        return {r[0]: RuntimeRecord(*r) for r in rows}
