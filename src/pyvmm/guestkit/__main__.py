"""``python -m pyvmm.guestkit``: prepare the default guest and print its paths.

Useful as a CI / benchmark preparation step: the first run downloads and
builds, later runs only print.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from typing import Any

from pyvmm.errors import PyvmmError
from pyvmm.guestkit import default_guest
from pyvmm.guestkit.kernel import describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvmm.guestkit", description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", action="store_true", help="ask apt for a newer kernel first")
    parser.add_argument("--gzip", action="store_true", help="gzip-compress the initramfs")
    parser.add_argument("--modules", help="comma-separated module list (default: the virtio drivers)")
    parser.add_argument("--append", action="append", default=[], help="extra kernel parameters")
    parser.add_argument("--json", action="store_true", help="print JSON instead of shell assignments")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr
    )
    kwargs: dict[str, Any] = {}
    if args.modules is not None:
        kwargs["modules"] = [m for m in args.modules.split(",") if m]
    try:
        guest = default_guest(refresh=args.refresh, compress=args.gzip, extra_cmdline=args.append, **kwargs)
    except PyvmmError as exc:
        print(f"pyvmm.guestkit: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out = {
            "kernel": str(guest.kernel),
            "initrd": str(guest.initrd),
            "cmdline": guest.cmdline,
            "modules": list(guest.modules),
            "kernel_info": describe(guest.kernel_info) if guest.kernel_info else None,
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"KERNEL={shlex.quote(str(guest.kernel))}")
        print(f"INITRD={shlex.quote(str(guest.initrd))}")
        print(f"CMDLINE={shlex.quote(guest.cmdline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
