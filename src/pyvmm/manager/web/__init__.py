"""The web UI's files: ``static/`` (page, script, style) and xterm.js, found at run time.

xterm.js is not kept in the source tree: ``python -m pyvmm.manager.web.fetch_xterm``
fetches the ``@xterm/xterm`` package from the npm registry with ``npm pack``
and unpacks its browser build into ``vendor/xterm`` (scripts/bootstrap runs
it).  ``PYVMM_XTERM_DIR`` points at another copy.  Without one the page still
works, showing the console as plain text.
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENDOR_XTERM = HERE / "vendor" / "xterm"


def static_dir() -> Path:
    return HERE / "static"


def xterm_dir() -> Path | None:
    """A directory holding xterm.js and xterm.css, or None."""
    candidates = [os.environ.get("PYVMM_XTERM_DIR"), str(VENDOR_XTERM)]
    for c in candidates:
        if c and (Path(c) / "xterm.js").is_file() and (Path(c) / "xterm.css").is_file():
            return Path(c)
    return None
