"""``pyvmm-system-x86_64``: pyvmm under QEMU's own command name and argv.

It takes exactly what ``qemu-system-x86_64`` takes, with no ``run`` subcommand, so tools that
run QEMU binaries (libvirt's ``<emulator>``, scripts) can name it.  What it accepts and what it
refuses is ``pyvmm run``'s option table; docs/qemu-compat.md says which QEMU interface level
it reports and how to recognise pyvmm behind it.
"""

from __future__ import annotations

import sys

from pyvmm import cli


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    return cli.main(["run", *args])


if __name__ == "__main__":
    sys.exit(main())
