"""The manager's third-party dependencies are the ``pyvmm[manager]`` extra.

``pyvmm run`` needs none of them.  ``pyvmm vm`` and ``pyvmmd`` check for them
first, so a base install says in one line what to install instead of
printing an import traceback.  This module imports only the standard library.
"""

from __future__ import annotations

import importlib.util
import sys

from pyvmm.errors import PyvmmError

#: The modules of the ``manager`` extra in pyproject.toml (import names).
MANAGER_MODULES = ("fastapi", "uvicorn", "pydantic", "websockets", "httpx", "qemu.qmp")


def missing_modules() -> list[str]:
    """The manager's modules that cannot be imported here."""
    missing = []
    for name in MANAGER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):   # a missing parent package (qemu), or a blocked module
            found = False
        if not found:
            missing.append(name)
    return missing


def require_manager(what: str) -> None:
    """Raise one clear :class:`PyvmmError` when the ``manager`` extra is not installed."""
    missing = missing_modules()
    if missing:
        raise PyvmmError(f"{what} needs the manager's dependencies, and {', '.join(missing)} "
                         "is not installed: pip install 'pyvmm[manager]'")


def pyvmmd_main() -> int:
    """The ``pyvmmd`` console script: the daemon, once its dependencies are known to be there."""
    try:
        require_manager("pyvmmd")
    except PyvmmError as e:
        print(f"pyvmmd: error: {e}", file=sys.stderr)
        return 1
    from pyvmm.manager.daemon import main

    return main()
