"""What /proc/locks says is locked on one file: the bytes QEMU's lock protocol uses."""

from __future__ import annotations

import os


def locked_bytes(path: str | os.PathLike, pid: int | None = None) -> set[int]:
    """Bytes of ``path`` locked by anyone (or only by ``pid``'s locks, for POSIX ones).

    /proc/locks merges adjacent ranges of one open file description, so a range is expanded.
    OFD locks list pid -1 on some kernels, so ``pid`` filters only when the line shows it.
    """
    st = os.stat(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:  # a blocked waiter
                continue
            # N: KIND ADVISORY TYPE PID MAJ:MIN:INODE START END
            if fields[5] != want:
                continue
            if pid is not None and fields[4] not in (str(pid), "-1"):
                continue
            end = fields[7]
            start = int(fields[6])
            stop = start if end == "EOF" else int(end)
            out.update(range(start, min(stop, start + 1000) + 1))
    return out


def lock_lines(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(start, end) of each lock line on ``path``: one per open file description and range run."""
    st = os.stat(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" not in fields and fields[5] == want:
                out.append((int(fields[6]), -1 if fields[7] == "EOF" else int(fields[7])))
    return out
