"""``python -m pyvmm.manager.logcap FILE``: a VM process's log, capped and rotated.

A VM process's stdout and stderr go into a pipe, and this small relay (one per
VM, in the VM's session, so it outlives a daemon restart just as the VM does)
copies the pipe into ``FILE``.  When ``FILE`` would pass ``--max-bytes`` it is
renamed to ``FILE.1`` (replacing the older one) and a new ``FILE`` begins, so
a VM's log never takes more than about twice the cap of the host's disk
however much its guest makes it write.  Each new file starts with the head of
the log (the VMM's start-up lines, among them the ``accelerator:`` line the
daemon reports), so what the VM chose at start stays readable.  On a full
disk the relay keeps draining the pipe, so the VM never blocks on its log,
and says how much it dropped once space is back.

Only the standard library is imported here: the relay starts with every VM.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

MAX_LOG_BYTES = 1 << 20
#: How much of the log's beginning is repeated at the top of every rotated file.
HEAD_BYTES = 8 << 10
READ_CHUNK = 64 << 10
ROTATED_MARK = b"pyvmm: log rotated at %d bytes (the previous part is in %s)\n"


class CappedLog:
    """Appends to ``path`` (already open as ``fd``), rotating to ``path.1`` before it passes ``max_bytes``."""

    def __init__(self, path: str, fd: int, max_bytes: int = MAX_LOG_BYTES, head_bytes: int = HEAD_BYTES) -> None:
        self.path = path
        self.fd = fd
        self.max_bytes = max(max_bytes, 2 * head_bytes + 4096)
        self.head_bytes = head_bytes
        self.head = bytearray()
        self.head_done = False
        self.size = os.fstat(fd).st_size
        self.fresh_size = self.size  # what a new file holds before any new output (the head after a rotation)
        self.dropped = 0

    def _keep_head(self, data: bytes) -> None:
        room = self.head_bytes - len(self.head)
        self.head += data[:room]
        if len(self.head) >= self.head_bytes:
            cut = self.head.rfind(b"\n")
            del self.head[cut + 1:]  # whole lines only (nothing if none ended)
            self.head_done = True

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def _rotate(self) -> None:
        try:
            os.replace(self.path, self.path + ".1")
        except FileNotFoundError:
            pass  # removed by hand: start a new one
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            new = os.open(self.path, flags, 0o600)
        except FileExistsError:  # something was put there in between: never follow or append to it
            os.unlink(self.path)
            new = os.open(self.path, flags, 0o600)
        os.close(self.fd)
        self.fd, self.size = new, 0
        self._write_all(bytes(self.head))
        self._write_all(ROTATED_MARK % (self.max_bytes, os.path.basename(self.path + ".1").encode()))
        self.fresh_size = self.size

    def write(self, data: bytes) -> None:
        if not self.head_done:
            self._keep_head(data)
        if self.dropped:
            note = b"pyvmm: the log was full: %d bytes were dropped\n" % self.dropped
            self.dropped = 0
            self.write(note)
        view = memoryview(data)
        try:
            while view:
                room = self.max_bytes - self.size
                if len(view) > room and (self.size > self.fresh_size or room <= 0):
                    self._rotate()  # whole lines stay in one file when they can
                    continue
                piece = view[:max(room, 0)]
                self._write_all(piece)
                view = view[len(piece):]
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            self.dropped += len(view)

    def pump(self, src: int) -> None:
        """Copy ``src`` into the log until its end (every writer has closed it)."""
        while True:
            try:
                data = os.read(src, READ_CHUNK)
            except InterruptedError:
                continue
            if not data:
                return
            self.write(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pyvmm-logcap", description="copy stdin into FILE (opened as stdout), "
                                "capped at --max-bytes and rotated to FILE.1")
    p.add_argument("file")
    p.add_argument("--max-bytes", type=int, default=MAX_LOG_BYTES)
    args = p.parse_args(argv)
    # The daemon's terminal signals are not ours: the relay ends when the VM's side of the pipe closes.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    out = os.dup(sys.stdout.fileno())
    log = CappedLog(args.file, out, args.max_bytes)
    log.pump(sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
