"""Test doubles shared by the character-device tests (back-ends, UART, virtio-console).

Kept in one module so the receiver/back-end contracts the tests rely on
(``can_receive``/``receive`` and ``write``/``attach``/``accept_input``) are
spelled out once; a change to :mod:`pyvmm.chardev.base` then needs one fix here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pyvmm.loop import MainLoop


class Collector:
    """A chardev receiver that holds at most ``room`` bytes in total.

    ``room`` may be changed by a test to model a guest that drains its FIFO;
    the default is large enough never to push back.
    """

    def __init__(self, room: int = 1 << 20) -> None:
        self.room = room
        self.data = bytearray()
        self.cond = threading.Condition()

    def can_receive(self) -> int:
        with self.cond:
            return max(0, self.room - len(self.data))

    def receive(self, data: bytes) -> None:
        with self.cond:
            self.data += data
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 3.0) -> bytes:
        """Wait until ``n`` bytes arrived (or the timeout) and return everything so far."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.data) >= n, timeout)
            return bytes(self.data)


class RecordingBackend:
    """A CharBackend stand-in: keeps what the device sends and counts accept_input calls.

    Tests push input by calling ``receiver.receive(...)`` themselves.
    """

    label = "test"

    def __init__(self) -> None:
        self.out = bytearray()
        self.receiver = None
        self.accept_calls = 0

    def write(self, data: bytes) -> int:
        self.out += data
        return len(data)

    def attach(self, receiver) -> None:
        self.receiver = receiver

    def accept_input(self) -> None:
        self.accept_calls += 1

    def close(self) -> None:
        pass


def running_loop(name: str) -> Iterator[MainLoop]:
    """Body of a pytest fixture: a MainLoop running on its own thread, stopped and closed after."""
    lp = MainLoop(name)
    lp.start_thread()
    yield lp
    lp.stop_thread()
    lp.close()
