"""Host thread names, as QEMU's ``-name debug-threads=on`` sets them: ``CPU 0/KVM``, ``CPU 1/TCG``.

Python's ``threading`` names are its own; the kernel's (``/proc/PID/task/TID/comm``, what ``ps -L``,
``top -H`` and libvirt show) are set here, by writing each thread's ``comm`` file.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

#: The kernel keeps at most 15 bytes of a thread name.
_COMM_MAX = 15


def name_thread(tid: int, name: str) -> None:
    with contextlib.suppress(OSError):
        with open(f"/proc/self/task/{tid}/comm", "w") as f:
            f.write(name[:_COMM_MAX])
        return
    log.debug("cannot name thread %d %r", tid, name)


def name_vcpu_threads(tids: list[int | None], accel: str) -> None:
    for index, tid in enumerate(tids):
        if tid is not None:
            name_thread(tid, f"CPU {index}/{accel.upper()}")
