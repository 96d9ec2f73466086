"""RAM passes driven by an accelerator's dirty log: only the chunks it names are compared and sent."""

from __future__ import annotations

from pyvmm.memory import GuestMemory
from pyvmm.vmstate.ram import CHUNK, RamSender


class Recorder:
    """A StreamWriter stand-in that keeps what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []
        self.zeros: list[tuple[int, int]] = []

    def pages_sent(self) -> list[int]:
        return [gpa for gpa, _ in self.sent]

    def pages(self, gpa: int, data: bytes | memoryview) -> None:
        self.sent.append((gpa, bytes(data)))

    def zero(self, gpa: int, length: int) -> None:
        self.zeros.append((gpa, length))


def test_dirty_pass_with_a_log_compares_only_the_chunks_it_names() -> None:
    mem = GuestMemory(4 << 20)
    try:
        mem.write(0x1000, b"a" * 10)
        mem.write(3 * CHUNK, b"b" * 10)
        w = Recorder()
        ram = RamSender(mem, w, track=True)  # type: ignore[arg-type]
        ram.full_pass()
        w.sent.clear()
        w.zeros.clear()
        mem.write(0x1000, b"A")           # logged below
        mem.write(3 * CHUNK + 8, b"B")    # not in the log: a log-driven pass must not look there
        mem.write(10 * CHUNK + 0x2000, b"C")  # a chunk that was zero and is in the log
        ram.dirty_pass([(0x1000, 1), (10 * CHUNK + 0x2000, 4096), (1 << 40, 4096)])
        assert w.pages_sent() == [0x1000, 10 * CHUNK]  # the changed page; the new chunk whole
        w.sent.clear()
        ram.dirty_pass()  # no log: everything is compared, and the unlogged change is found
        assert w.pages_sent() == [3 * CHUNK]
        w.sent.clear()
        ram.dirty_pass([])
        assert w.sent == [] and w.zeros == []
    finally:
        mem.close()
