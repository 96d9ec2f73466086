"""What ``query-migrate`` reports, and the parameters ``migrate-set-parameters`` sets."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pyvmm.vmstate.ram import PAGE
from pyvmm.vmstate.stream import StreamWriter

#: QEMU's defaults: 300 ms and 128 MiB/s.
DEFAULT_DOWNTIME_LIMIT_MS = 300
DEFAULT_MAX_BANDWIDTH = 128 << 20


@dataclass
class Params:
    downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS
    max_bandwidth: int = DEFAULT_MAX_BANDWIDTH

    def query(self) -> dict[str, Any]:
        return {"downtime-limit": self.downtime_limit_ms, "max-bandwidth": self.max_bandwidth}


@dataclass
class MigrationStatus:
    status: str = "none"
    start: float = 0.0
    setup_end: float = 0.0
    stop_time: float = 0.0
    end: float = 0.0
    error: str = ""
    writer: StreamWriter | None = None
    ram_total: int = 0
    ram_normal_bytes: int = 0
    ram_duplicate: int = 0
    remaining: int = 0
    dirty_pages_rate: int = 0
    expected_downtime_ms: int = 0
    passes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def begin(self) -> None:
        self.__init__()  # type: ignore[misc]
        self.start = time.monotonic()

    def setup_done(self) -> None:
        self.setup_end = time.monotonic()

    def finish(self) -> None:
        self.end = time.monotonic()

    @property
    def downtime_ms(self) -> int:
        return int(1000 * (self.end - self.stop_time)) if self.stop_time and self.end else 0

    def _ms(self, a: float, b: float) -> int:
        return int(1000 * (b - a)) if a else 0

    def query(self) -> dict[str, Any]:
        """QEMU's MigrationInfo for the current status (``{}`` before any migration)."""
        if self.status == "none":
            return {}
        out: dict[str, Any] = {"status": self.status}
        now = time.monotonic()
        if self.status in ("active", "device", "completed", "setup", "cancelling"):
            out["setup-time"] = self._ms(self.start, self.setup_end or now)
            out["total-time"] = self._ms(self.start, self.end or now)
        if self.status in ("active", "device"):
            out["expected-downtime"] = self.expected_downtime_ms
        if self.status == "completed":
            out["downtime"] = self.downtime_ms
        if self.status in ("active", "device", "completed"):
            out["ram"] = self._ram(now)
        if self.status == "failed" and self.error:
            out["error-desc"] = self.error
        return out

    def _ram(self, now: float) -> dict[str, Any]:
        sent = self.writer.bytes if self.writer is not None else 0
        seconds = max((self.end or now) - (self.setup_end or self.start), 1e-3)
        return {
            "transferred": sent,
            "remaining": 0 if self.status == "completed" else self.remaining,
            "total": self.ram_total,
            "duplicate": self.ram_duplicate,
            "normal": self.ram_normal_bytes // PAGE,
            "normal-bytes": self.ram_normal_bytes,
            "skipped": 0,
            "dirty-pages-rate": self.dirty_pages_rate,
            "dirty-sync-count": self.passes,
            "mbps": round(sent * 8 / 1e6 / seconds, 3),
            "page-size": PAGE,
            "precopy-bytes": sent,
        }
