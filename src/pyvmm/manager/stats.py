"""Process facts from /proc: liveness, identity, CPU time and resident memory of a VM process.

A pid alone does not identify a process across a daemon restart (pids are
reused), so a VM process is identified by pid + start time (field 22 of
/proc/PID/stat, in clock ticks since boot) + its command line naming the VM's
uuid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    state: str
    utime: int
    stime: int
    start_ticks: int
    rss_pages: int

    @property
    def cpu_time_s(self) -> float:
        return (self.utime + self.stime) / CLK_TCK


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/PID/stat, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return ProcStat(state=rest[0].decode(), utime=int(rest[11]), stime=int(rest[12]),
                        start_ticks=int(rest[19]), rss_pages=int(rest[21]))
    except (IndexError, ValueError):
        return None


def read_rss_bytes(pid: int) -> int | None:
    """VmRSS from /proc/PID/status (kB) in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return None
    return 0


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def is_vm_process(pid: int, start_ticks: int, uuid: str) -> bool:
    """True if ``pid`` is alive (not a zombie), started at ``start_ticks`` and names ``uuid`` on its command line."""
    st = read_stat(pid)
    if st is None or st.state in ("Z", "X") or st.start_ticks != start_ticks:
        return False
    return any(uuid in arg for arg in read_cmdline(pid))


class CpuSampler:
    """Turns successive CPU-time readings into a percentage (100 = one core busy)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def sample(self, now: float, cpu_time_s: float) -> float:
        last, self._last = self._last, (now, cpu_time_s)
        if last is None or now <= last[0]:
            return 0.0
        return max(0.0, 100.0 * (cpu_time_s - last[1]) / (now - last[0]))
