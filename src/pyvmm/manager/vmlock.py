"""A VM process's identity that needs no disk space and survives the daemon: a lock its process holds.

Before the daemon starts a VM it takes an exclusive ``flock`` on the VM's
``vm.lock`` in its run directory and hands that open file to the VM process
(``pass_fds``), then closes its own copy.  From then on the lock is held
exactly as long as the VM process (or anything it forked without closing the
file) is alive, whether or not the daemon managed to write the VM's runtime
record, and whether or not the daemon is still running.  So:

* a daemon never starts a VM whose lock is held (the VM is already running);
* a restarted daemon that finds a held lock but no usable record finds the
  process by the open file (``/proc/PID/fd``) and takes it over.

An empty file and a lock take no disk blocks, so this works on a full disk,
when the SQLite store cannot be written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "vm.lock"


def try_lock(vmdir: Path) -> int | None:
    """The open, exclusively locked ``vm.lock`` of ``vmdir`` (close-on-exec), or None if a process holds it."""
    fd = os.open(vmdir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_held(vmdir: Path) -> bool:
    """True if a live process holds ``vmdir``'s VM lock (False also when there is no lock file)."""
    if not (vmdir / LOCK_NAME).exists():
        return False
    fd = try_lock(vmdir)
    if fd is None:
        return True
    os.close(fd)
    return False


def holders(vmdir: Path, uuid: str) -> list[int]:
    """The pids of processes that name ``uuid`` on their command line and have ``vmdir``'s lock file open."""
    try:
        st = os.stat(vmdir / LOCK_NAME, follow_symlinks=False)
    except FileNotFoundError:
        return []
    want = (st.st_dev, st.st_ino)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            if uuid.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    fst = os.stat(f"/proc/{pid}/fd/{fd}")
                    if (fst.st_dev, fst.st_ino) == want:
                        found.append(pid)
                        break
    return found
