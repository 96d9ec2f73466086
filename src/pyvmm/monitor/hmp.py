"""A small human monitor (HMP) behind QMP's ``human-monitor-command``.

Only the commands people reach for while debugging a guest exist.  Output
uses ``\\r\\n`` line ends like QEMU's monitor, and an unknown command is not
an error: its text says so, as in QEMU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyvmm import __version__
from pyvmm.monitor.control import ChardevInfo, MachineControl
from pyvmm.monitor.errors import QmpError


@dataclass(frozen=True)
class _Ctx:
    machine: MachineControl
    cpu_index: int
    monitor_chardevs: list[ChardevInfo]


def _crlf(text: str) -> str:
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    return "".join(line + "\r\n" for line in lines) if text else ""


def _check_cpu(ctx: _Ctx, index: int) -> None:
    if index not in {c.index for c in ctx.machine.cpus()}:
        raise QmpError("Invalid CPU index")


def _info_status(ctx: _Ctx, args: list[str]) -> str:
    return f"VM status: {ctx.machine.status().value}\r\n"


def _info_registers(ctx: _Ctx, args: list[str]) -> str:
    if "-a" in args:
        return "".join(f"\r\nCPU#{c.index}\r\n" + _crlf(ctx.machine.cpu_dump(c.index)) for c in ctx.machine.cpus())
    _check_cpu(ctx, ctx.cpu_index)
    return _crlf(ctx.machine.cpu_dump(ctx.cpu_index))


def _info_cpus(ctx: _Ctx, args: list[str]) -> str:
    return "".join(f"{'*' if c.index == ctx.cpu_index else ' '} CPU #{c.index}: thread_id={c.thread_id}\r\n"
                   for c in ctx.machine.cpus())


def _info_chardev(ctx: _Ctx, args: list[str]) -> str:
    return "".join(f"{d.label}: filename={d.filename}\r\n" for d in [*ctx.machine.chardevs(), *ctx.monitor_chardevs])


def _info_version(ctx: _Ctx, args: list[str]) -> str:
    return f"{__version__} (pyvmm {__version__})\r\n"


_INFO: dict[str, tuple[Callable[[_Ctx, list[str]], str], str]] = {
    "status": (_info_status, "show the current VM status (running|paused)"),
    "registers": (_info_registers, "[-a] show the cpu registers (-a: all vCPUs)"),
    "cpus": (_info_cpus, "show infos for each CPU"),
    "chardev": (_info_chardev, "show the character devices"),
    "version": (_info_version, "show the version of pyvmm"),
}


def _info(ctx: _Ctx, args: list[str]) -> str:
    if not args:
        return "".join(f"info {name} -- {doc}\r\n" for name, (_, doc) in _INFO.items())
    entry = _INFO.get(args[0])
    if entry is None:
        return f"unknown command: 'info {args[0]}'\r\n"
    return entry[0](ctx, args[1:])


def _stop(ctx: _Ctx, args: list[str]) -> str:
    ctx.machine.pause()
    return ""


def _cont(ctx: _Ctx, args: list[str]) -> str:
    ctx.machine.resume()
    return ""


def _system_reset(ctx: _Ctx, args: list[str]) -> str:
    ctx.machine.system_reset()
    return ""


def _system_powerdown(ctx: _Ctx, args: list[str]) -> str:
    ctx.machine.system_powerdown()
    return ""


def _quit(ctx: _Ctx, args: list[str]) -> str:
    ctx.machine.quit()
    return ""


def _help(ctx: _Ctx, args: list[str]) -> str:
    return "".join(f"{name} -- {doc}\r\n" for name, (_, doc) in sorted(_COMMANDS.items()))


_COMMANDS: dict[str, tuple[Callable[[_Ctx, list[str]], str], str]] = {
    "info": (_info, "show various information about the system state"),
    "stop": (_stop, "stop emulation"),
    "cont": (_cont, "resume emulation"),
    "c": (_cont, "resume emulation"),
    "system_reset": (_system_reset, "reset the system"),
    "system_powerdown": (_system_powerdown, "send system power down event"),
    "quit": (_quit, "quit the emulator"),
    "q": (_quit, "quit the emulator"),
    "help": (_help, "show the help"),
    "?": (_help, "show the help"),
}


def execute(command_line: str, machine: MachineControl, cpu_index: int = 0,
            monitor_chardevs: list[ChardevInfo] | None = None) -> str:
    """Run one HMP command line; return its output text."""
    words = command_line.split()
    if not words:
        return ""
    entry = _COMMANDS.get(words[0])
    if entry is None:
        return f"unknown command: '{words[0]}'\r\n"
    return entry[0](_Ctx(machine, cpu_index, monitor_chardevs or []), words[1:])
