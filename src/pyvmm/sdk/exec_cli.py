"""``pyvmm exec [RUN OPTIONS] -- CMD [ARGS...]``: boot the default guest, run CMD, exit with its status.

As ``docker run --rm``: CMD's stdout and stderr stream to ours while it runs, and the process
exits with CMD's status (``128 + N`` for signal N).  pyvmm's own failures exit with
:data:`EXIT_VMM_ERROR` (125, as docker's).  Run options understood here: ``-m/--memory``,
``-smp/--smp``, ``-accel/--accel``, ``--kernel``/``--initrd``/``--append``, ``--share
HOST_DIR:TAG``, ``--timeout SECONDS``, ``--vmm pyvmm|qemu``, ``--snapshot FILE`` (start from
``VM.snapshot()``'s file instead of booting); anything else (``-drive``,
``-device``, ``-netdev``...) goes to the VMM as it is.
"""

from __future__ import annotations

import logging
import os
import sys

from pyvmm.errors import PyvmmError
from pyvmm.sdk.vm import VM

log = logging.getLogger(__name__)

EXIT_VMM_ERROR = 125
USAGE = "usage: pyvmm exec [RUN OPTIONS] -- CMD [ARGS...]"
_VALUED = {"m": "memory", "memory": "memory", "smp": "cpus", "accel": "accel", "kernel": "kernel",
           "initrd": "initrd", "append": "append", "share": "share", "timeout": "timeout", "vmm": "vmm",
           "snapshot": "snapshot"}


def parse_exec_args(argv: list[str]) -> tuple[dict[str, object], list[str], list[str]]:
    """(VM keyword arguments, pass-through VMM options, the command)."""
    if "--" not in argv:
        raise PyvmmError(f"no command: {USAGE}")
    cut = argv.index("--")
    opts, command = argv[:cut], argv[cut + 1:]
    if not command:
        raise PyvmmError(f"no command after --: {USAGE}")
    kw: dict[str, object] = {}
    shares: list[str] = []
    extra: list[str] = []
    i = 0
    while i < len(opts):
        arg = opts[i]
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in _VALUED:
            if not eq:
                if i + 1 >= len(opts):
                    raise PyvmmError(f"{arg} needs a value")
                value = opts[i + 1]
                i += 1
            key = _VALUED[name]
            if key == "share":
                shares.append(value)
            elif key == "cpus":
                try:
                    kw["cpus"] = int(value.split(",")[0].removeprefix("cpus="))
                except ValueError:
                    raise PyvmmError(f"{arg} {value}: a number of vCPUs") from None
            elif key == "timeout":
                try:
                    kw["timeout"] = float(value)
                except ValueError:
                    raise PyvmmError(f"--timeout {value}: seconds") from None
            else:
                kw[key] = value
        else:
            extra.append(arg)
        i += 1
    if shares:
        kw["shares"] = shares
    return kw, extra, command


def _writer(fd: int):  # noqa: ANN202 - a sink for VM.exec_stream
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    return write


def main_exec(argv: list[str]) -> int:
    try:
        kw, extra, command = parse_exec_args(argv)
        timeout = kw.pop("timeout", None)
        assert timeout is None or isinstance(timeout, float)
        with VM(extra_args=extra, **kw) as vm:  # type: ignore[arg-type]
            status = vm.exec_stream(command, _writer(sys.stdout.fileno()), _writer(sys.stderr.fileno()),
                                    timeout=timeout)
            vm.stop(timeout=30)
        return status
    except PyvmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return 130
