"""Telling a full disk (ENOSPC, EDQUOT, SQLite's "database or disk is full") from other write failures.

The daemon writes its store, its VMs' logs and run files.  When one of those
writes fails, the client gets a clear JSON error: 507 Insufficient Storage for
a full disk or an exhausted quota, else 500 naming what failed.
"""

from __future__ import annotations

import errno
import os
import sqlite3

INSUFFICIENT_STORAGE = 507
OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in OUT_OF_SPACE_ERRNOS
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


def describe(exc: BaseException) -> str:
    """One line for a failed write: the OS's words for an OSError, SQLite's for a store error."""
    if isinstance(exc, OSError):
        what = os.strerror(exc.errno) if exc.errno else str(exc)
        return f"{exc.filename}: {what}" if exc.filename else what
    return str(exc) or type(exc).__name__


def status_and_message(exc: BaseException, doing: str) -> tuple[int, str]:
    """The HTTP status and the message for ``exc`` raised while ``doing`` (e.g. "cannot store VM web")."""
    if is_out_of_space(exc):
        return INSUFFICIENT_STORAGE, f"{doing}: the daemon's disk is full ({describe(exc)})"
    return 500, f"{doing}: {describe(exc)}"
