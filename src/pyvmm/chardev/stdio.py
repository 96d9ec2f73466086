"""The ``stdio`` back-end: the guest console on the user's terminal.

When stdin is a terminal it is put in raw mode the way QEMU does it (no echo,
no line editing, no CR/LF translation on input, 8-bit clean; output
post-processing and, unless ``signal=off``, Ctrl-C/Ctrl-Z signals are kept),
so the guest's line discipline does the editing.  QEMU's escape prefix Ctrl-A
is understood on input:

* ``Ctrl-A x``      quit (restores the terminal, then calls ``on_quit``, by
  default ``control.request_exit(0)``)
* ``Ctrl-A h``/``?`` print the escape help
* ``Ctrl-A Ctrl-A`` send one Ctrl-A to the guest

The terminal is always restored: on :meth:`close` (callers do that in a
``finally``), at interpreter exit (``atexit``) and on SIGTERM/SIGHUP/SIGQUIT
when nobody else handles those signals (the handler restores, then re-raises
the signal with its default action).  Restoring is idempotent.

stdin need not be a terminal (a pipe, a file, /dev/null): then nothing is
changed, input is still forwarded, and at EOF the back-end just stops
reading.  Started as a background job (``pyvmm ... &``), it leaves the
terminal alone and reads no input, rather than being stopped by SIGTTOU.

Output goes to stdout with ordinary blocking writes: stdout is shared with
the parent shell, so its file status flags are never touched.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import termios
import threading
from collections.abc import Callable
from typing import Any

from pyvmm.chardev.base import CharBackendBase, write_blocking
from pyvmm.loop import MainLoop
from pyvmm.runstate import VmControl

log = logging.getLogger(__name__)

ESCAPE_CHAR = 0x01  # Ctrl-A

HELP_TEXT = (
    b"\r\n"
    b"C-a h    print this help\r\n"
    b"C-a x    exit emulator\r\n"
    b"C-a C-a  sends C-a\r\n"
)

_RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def raw_attributes(attrs: list, allow_signals: bool) -> list:
    """QEMU's stdio terminal settings derived from the current ``termios`` attributes."""
    new: list[Any] = [list(a) if isinstance(a, list) else a for a in attrs]
    iflag, oflag, cflag, lflag = 0, 1, 2, 3
    new[iflag] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                    | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    new[oflag] |= termios.OPOST
    new[lflag] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
    if not allow_signals:
        new[lflag] &= ~termios.ISIG
    new[cflag] &= ~(termios.CSIZE | termios.PARENB)
    new[cflag] |= termios.CS8
    cc = new[6]
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return new


def _in_background(fd: int) -> bool:
    """True when ``fd`` is our controlling terminal and another process group owns it."""
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False  # not our controlling terminal: no job control applies


class StdioBackend(CharBackendBase):
    """Guest console on stdin/stdout (fds are parameters so tests can use a pty)."""

    def __init__(self, loop: MainLoop, label: str = "serial0", *,
                 on_quit: Callable[[], None] | None = None, control: VmControl | None = None,
                 allow_signals: bool = True, in_fd: int = 0, out_fd: int = 1) -> None:
        super().__init__(label, loop)
        self._in = in_fd
        self._out = out_fd
        self._on_quit = on_quit
        self._control = control
        self._escape = False
        self._saved_attrs: list | None = None
        self._old_handlers: dict[int, object] = {}
        self._out_broken = False
        self._tty = os.isatty(in_fd)
        self._background = self._tty and _in_background(in_fd)
        if self._background:
            # Touching the terminal from a background job stops us with SIGTTOU/SIGTTIN.
            log.info("%s: started in the background: console input disabled, terminal untouched", label)
        elif self._tty:
            self._saved_attrs = termios.tcgetattr(in_fd)
            atexit.register(self.restore_terminal)
            self._install_signal_handlers()
            termios.tcsetattr(in_fd, termios.TCSANOW, raw_attributes(self._saved_attrs, allow_signals))

    @property
    def is_tty(self) -> bool:
        return self._tty

    # -- output ------------------------------------------------------------------------------
    def write(self, data: bytes) -> int:
        if self._closed or self._out_broken:
            return 0
        try:
            return write_blocking(self._out, data)
        except OSError as e:
            # stdout gone (EPIPE, closed terminal): keep the VM running, stop writing.
            self._out_broken = True
            log.warning("%s: stdout write failed (%s); console output is now discarded", self.label, e)
            return 0

    # -- input -------------------------------------------------------------------------------
    def _on_attach(self) -> None:
        if not self._background:
            self._start_input(self._in)

    def _on_eof(self) -> None:
        log.debug("%s: EOF on stdin; no more console input", self.label)
        self._stop_input()

    def _filter_input(self, data: bytes) -> bytes:
        if ESCAPE_CHAR not in data and not self._escape:
            return data
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b == ESCAPE_CHAR:
                    out.append(b)
                elif b in (ord("x"), ord("X")):
                    self._quit()
                    break
                elif b in (ord("h"), ord("?")):
                    self.write(HELP_TEXT)
                else:
                    log.debug("%s: unknown escape C-a %#x ignored", self.label, b)
            elif b == ESCAPE_CHAR:
                self._escape = True
            else:
                out.append(b)
        return bytes(out)

    def _quit(self) -> None:
        self.write(b"\r\npyvmm: terminated\r\n")
        self._stop_input()
        self.restore_terminal()
        if self._on_quit is not None:
            self._on_quit()
        elif self._control is not None:
            self._control.request_exit(0, "quit from the console (C-a x)")
        else:
            log.warning("%s: C-a x pressed but nothing to tell", self.label)

    # -- terminal restore --------------------------------------------------------------------
    def restore_terminal(self) -> None:
        """Put the terminal back as it was.  Idempotent; safe in atexit and signal handlers."""
        # No lock: a signal handler may interrupt a restore in progress, and restoring the
        # same attributes twice is harmless.
        attrs, self._saved_attrs = self._saved_attrs, None
        if attrs is None:
            return
        try:
            termios.tcsetattr(self._in, termios.TCSANOW, attrs)
        except (termios.error, OSError):
            pass  # terminal already gone
        try:
            atexit.unregister(self.restore_terminal)
        except Exception:
            pass

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _RESTORE_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_DFL:
                self._old_handlers[sig] = signal.SIG_DFL
                signal.signal(sig, self._on_fatal_signal)

    def _remove_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            if signal.getsignal(sig) == self._on_fatal_signal:
                signal.signal(sig, old)  # type: ignore[arg-type]
        self._old_handlers.clear()

    def _on_fatal_signal(self, signum: int, _frame: object) -> None:
        self.restore_terminal()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.restore_terminal()
            self._remove_signal_handlers()
