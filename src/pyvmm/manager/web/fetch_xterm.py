"""Fetch xterm.js from the npm registry (``npm pack``) into ``vendor/xterm``.

Run as ``python -m pyvmm.manager.web.fetch_xterm [--dest DIR]``.  Only the two files
the page loads are kept: ``lib/xterm.js`` (the browser build, which defines
``window.Terminal``) and ``css/xterm.css``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pyvmm.manager.web import VENDOR_XTERM

log = logging.getLogger(__name__)

PACKAGE = "@xterm/xterm@5.5.0"
FILES = {"package/lib/xterm.js": "xterm.js", "package/css/xterm.css": "xterm.css",
         "package/LICENSE": "LICENSE"}


class VendorError(RuntimeError):
    pass


def fetch_xterm(dest: Path = VENDOR_XTERM, package: str = PACKAGE) -> Path:
    """Download ``package`` with npm and unpack xterm.js/xterm.css into ``dest``; returns ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise VendorError("npm not found: install Debian's npm package to fetch xterm.js")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([npm, "pack", package, "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True, cwd=tmp, timeout=300)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise VendorError(f"npm pack {package} failed: {proc.stderr.strip()[-500:]}")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs[0]) as tar:
            for member, name in FILES.items():
                f = tar.extractfile(member)
                if f is None:
                    raise VendorError(f"{package}: {member} missing from the package")
                (dest / name).write_bytes(f.read())
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dest", type=Path, default=VENDOR_XTERM)
    p.add_argument("--package", default=PACKAGE)
    args = p.parse_args(argv)
    try:
        print(fetch_xterm(args.dest, args.package))
    except VendorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
