"""Polling for a condition another thread (or process) makes true."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(pred: Callable[[], object], timeout: float = 5.0, interval: float = 0.005) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds have passed; whether it became true
    (it is asked once more at the deadline, so a slow last step still counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
