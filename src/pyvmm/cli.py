"""The ``pyvmm`` command line.

``pyvmm run`` starts one VM in this process and reads QEMU's command line: exact option
names (``-m``, ``-machine``, ``-mon`` and ``-msg`` are four options; no prefix is expanded),
each spelt with one dash or two, arguments in QEMU's QemuOpts or JSON syntax
(:mod:`pyvmm.qemuopts`).  pyvmm's own long names (``--memory``, ``--kernel``...) work too,
also as ``--name=value``.  An option pyvmm knows but cannot honour is refused, never
ignored.  Every :class:`~pyvmm.errors.PyvmmError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pyvmm import __version__, compat_options
from pyvmm.block.blockdev import parse_blockdev
from pyvmm.chardev.parse import parse_spec
from pyvmm.config import (
    CHARDEV_SYNTAX,
    DEVICE_SYNTAX,
    MAX_SMP,
    SMP_SYNTAX,
    BootConfig,
    CpuConfig,
    DeviceSpec,
    MachineConfig,
    SmpConfig,
    chardev_from_opts,
)
from pyvmm.devices.virtio.options import parse_drive
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.memory_options import backends_from_args, machine_backend
from pyvmm.net.options import parse_netdev
from pyvmm.qemuopts import OptionSyntax, Opts, escape, parse, parse_size
from pyvmm.runstate import PanicAction, VmControl
from pyvmm.sandbox import SandboxConfig, parse_sandbox
from pyvmm.sandbox import available as sandbox_available

log = logging.getLogger("pyvmm")

EXIT_ERROR = 1


# -- the option table ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One command-line option: its names (QEMU's first), whether it takes an argument."""

    names: tuple[str, ...]
    metavar: str = ""  # empty: a flag without argument
    help: str = ""

    @property
    def name(self) -> str:
        return self.names[0]


OPTIONS: tuple[Option, ...] = (
    Option(("machine", "M"), "TYPE[,prop=value]", "machine type: pc, or none (a QMP monitor and no guest)"),
    Option(("kernel",), "FILE", "bzImage, vmlinux (ELF/PVH), multiboot image or boot sector; "
                                "default: the guest kit's stock Linux"),
    Option(("initrd",), "FILE", "initramfs, or multiboot modules as 'mod1 args,mod2'"),
    Option(("append",), "CMDLINE", "kernel command line"),
    Option(("m", "memory"), "[size=]SIZE", "RAM size, e.g. 256M or 2G; a plain number is MiB (default 512M)"),
    Option(("smp",), "[cpus=]N[,sockets=S][,dies=D][,cores=C][,threads=T][,maxcpus=M]", "vCPUs and topology"),
    Option(("accel",), "kvm|tcg|auto", "CPU accelerator (default: auto, which probes /dev/kvm); "
                                       "repeat for a fallback list"),
    Option(("enable-kvm",), "", "the same as -accel kvm"),
    Option(("cpu",), "MODEL[,+feat,-feat]", "CPU model and features"),
    Option(("serial",), "SPEC", "COM1 back-end: stdio, file:PATH, unix:PATH[,server=on,wait=off], pty, null, none"),
    Option(("no-reboot",), "", "exit instead of rebooting"),
    Option(("no-shutdown",), "", "a guest power-off stops the VM but the process stays (QMP system_reset + cont)"),
    Option(("overcommit",), "mem-lock=off[,cpu-pm=off]", "only off: pyvmm never locks RAM or passes idling through"),
    Option(("global",), "PIIX4_PM.disable_s3=1 | PIIX4_PM.disable_s4=1", "only these: pyvmm has no S3/S4"),
    Option(("no-hpet",), "", "no HPET (pyvmm never has one)"),
    Option(("action",), "panic=ACTION[,reboot=reset|shutdown][,shutdown=poweroff]",
           "what a guest event does, as QEMU's -action; panic=shutdown|pause|exit-failure|none"),
    Option(("nographic",), "", "no graphics (pyvmm never has any)"),
    Option(("display",), "none", "only 'none': pyvmm has no display"),
    Option(("device",), "DRIVER[,prop=value] | JSON", "add a device, e.g. isa-debug-exit,iobase=0xf4,iosize=0x04"),
    Option(("drive",), "file=PATH[,format=raw|qcow2][,readonly=on][,if=virtio|none][,id=ID][,serial=S]",
           "a virtio-blk disk (if=virtio: virtio-mmio; if=none: for -device virtio-blk-pci,drive=ID)"),
    Option(("chardev",), "BACKEND,id=ID[,path=P,...]", "a named character back-end: socket, file, stdio, pty, null"),
    Option(("netdev",), "user|tap,id=ID[,...] | JSON", "a host network back-end for -device virtio-net-pci"),
    Option(("mem-path",), "PATH", "back guest RAM with a file or hugetlbfs, allocated at start (as -mem-prealloc)"),
    Option(("mem-prealloc",), "", "back every page of guest RAM at start, as QEMU does (fails then, not later)"),
    Option(("qmp",), "unix:PATH,server=on[,wait=off]", "serve the QEMU Machine Protocol"),
    Option(("mon",), "[chardev=]ID,mode=control", "a QMP monitor on a -chardev socket"),
    Option(("monitor",), "none", "only 'none' (pyvmm has no human monitor; use -qmp)"),
    Option(("name",), "[guest=]NAME[,process=P]", "the guest's name; process= names the host process"),
    Option(("uuid",), "UUID", "the machine's UUID"),
    Option(("msg",), "timestamp=on|off[,guest-name=on|off]", "message format"),
    Option(("no-user-config",), "", "read no configuration files (pyvmm reads none)"),
    Option(("nodefaults",), "", "no default devices: no serial port back-end unless -serial is given"),
    Option(("S",), "", "start with the vCPUs stopped; QMP 'cont' starts them"),
    Option(("incoming",), "unix:PATH|tcp:HOST:PORT|exec:CMD|defer",
           "wait for a migration stream (QMP migrate from another VMM) instead of booting"),
    Option(("no-acpi",), "", "no ACPI tables"),
    Option(("boot",), "[order=]DRIVES[,once=D][,menu=on|off][,strict=on|off]",
           "checked as QEMU does; with -kernel the kernel boots"),
    Option(("rtc",), "base=utc|localtime|DATE[,clock=host][,driftfix=none]", "the RTC's start time"),
    Option(("daemonize",), "", "detach once the VM is set up"),
    Option(("pidfile",), "FILE", "write the process id to FILE (locked while running)"),
    Option(("sandbox",), "on|off[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]"
                         "[,spawn=allow|deny][,resourcecontrol=allow|deny]",
           "a seccomp allow-list of system calls once the VM is set up (docs/sandbox.md)"),
    Option(("object",), "memory-backend-{memfd,file,ram},id=ID,size=S[,share=on][,mem-path=P] | "
                        "secret,id=ID,data=D|file=F[,format=raw|base64] | JSON",
           "a guest RAM back-end, for -machine memory-backend=ID or -numa node,memdev=ID; or a named secret"),
    Option(("numa",), "node,memdev=ID", "one NUMA node whose RAM is the memory back-end ID"),
    Option(("blockdev",), "JSON | driver=file|raw|qcow2,node-name=N[,...]",
           "a block node (QEMU's grammar), for -device virtio-blk-pci,drive=N"),
    Option(("snapshot",), "", "every -drive gets a temporary overlay: the images are never written"),
    Option(("audiodev",), "none,id=ID | JSON", "an audio back-end; only 'none' (pyvmm has no sound devices)"),
    Option(("verbose", "v"), "", "more log output (-vv for debug)"),
    Option(("quiet", "q"), "", "only errors on stderr"),
    Option(("version",), "", "print the version and exit"),
    Option(("help", "h"), "", "print this help and exit"),
)
_BY_NAME: dict[str, Option] = {n: o for o in OPTIONS for n in o.names}


@dataclass
class RunArgs:
    """``pyvmm run``'s command line: each option's arguments, in order."""

    command: str = "run"
    given: dict[str, list[str]] = field(default_factory=dict)  # canonical name -> arguments ("" for flags)
    verbose: int = 0
    quiet: bool = False

    def all(self, name: str) -> list[str]:
        return self.given.get(name, [])

    def last(self, name: str, default: str | None = None) -> str | None:
        values = self.given.get(name)
        return values[-1] if values else default

    def has(self, name: str) -> bool:
        return name in self.given

    # argparse-compatible views of the old attribute names
    @property
    def append(self) -> str | None:
        return self.last("append")

    @property
    def kernel(self) -> str | None:
        return self.last("kernel")


def parse_run_args(argv: list[str]) -> RunArgs:
    """Split ``argv`` into options; unknown names, prefixes and missing arguments are refused."""
    args = RunArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "-vv":
            args.verbose += 2
            continue
        if not arg.startswith("-") or arg in ("-", "--"):
            raise ConfigError(f"{arg}: unexpected argument (pyvmm takes no disk image argument; use -drive file=...)")
        name = arg[2:] if arg.startswith("--") else arg[1:]
        inline: str | None = None
        if arg.startswith("--") and "=" in name:  # pyvmm's (argparse's) --name=value spelling
            name, _, inline = name.partition("=")
        opt = _BY_NAME.get(name)
        if opt is None:
            raise ConfigError(f"{arg}: invalid option")
        if opt.metavar:
            if inline is None:
                if i >= len(argv):
                    raise ConfigError(f"{arg}: requires an argument")
                inline = argv[i]
                i += 1
            value = inline
        else:
            if inline is not None:
                raise ConfigError(f"{arg}: takes no argument")
            value = ""
        if opt.name == "verbose":
            args.verbose += 1
        elif opt.name == "quiet":
            args.quiet = True
        args.given.setdefault(opt.name, []).append(value)
    return args


def run_help() -> str:
    lines = ["usage: pyvmm run [options]", "",
             "QEMU's option names (one dash or two) and argument syntax; pyvmm's long names too.", ""]
    for o in OPTIONS:
        spelling = ", ".join(f"-{n}" for n in o.names)
        lines.append(f"  {spelling} {o.metavar}".rstrip())
        lines.append(f"      {o.help}")
    return "\n".join(lines)


# -- option syntaxes QEMU 7.2 gives each option -----------------------------------------------------

_PC_PROPS_OFF_ONLY = {  # QEMU machine properties pyvmm honours only in their "off" setting
    "usb": "it has no USB", "vmport": "it has no VMware port", "hpet": "it has no HPET", "graphics": "it has no "
    "display", "dump-guest-core": "it writes no core dumps of guest memory", "smm": "it has no SMM",
    "sata": "it has no SATA"}
_PC_PROPS_ON_ONLY = {"pit": "its PIT is always present"}  # ... and only in their "on" setting
MACHINE_SYNTAX = OptionSyntax("machine", implied="type")
ACCEL_SYNTAX = OptionSyntax("accel", implied="accel")
MEMORY_SYNTAX = OptionSyntax("m", implied="size", keys=("size", "slots", "maxmem"))
NAME_SYNTAX = OptionSyntax("name", implied="guest", keys=("guest", "process", "debug-threads"))
MSG_SYNTAX = OptionSyntax("msg", keys=("timestamp", "guest-name"))
BOOT_SYNTAX = OptionSyntax("boot", implied="order",
                           keys=("order", "once", "menu", "splash", "splash-time", "reboot-timeout", "strict"))
RTC_SYNTAX = OptionSyntax("rtc", keys=("base", "clock", "driftfix"))
ACTION_SYNTAX = OptionSyntax("action", keys=("reboot", "shutdown", "panic", "watchdog"))
DISPLAY_SYNTAX = OptionSyntax("display", implied="type")
MON_SYNTAX = OptionSyntax("mon", implied="chardev", keys=("chardev", "mode", "pretty", "id"))
AUDIODEV_SYNTAX = OptionSyntax("audiodev", implied="driver", json=True)
#: QEMU 7.2's display types; pyvmm honours only none.
_DISPLAYS = ("none", "gtk", "sdl", "egl-headless", "curses", "cocoa", "dbus", "spice-app", "vnc")
_ACCEL_PROPS = {"tcg": ("thread", "tb-size", "split-wx", "one-insn-per-tb"),
                "kvm": ("kernel-irqchip", "kvm-shadow-mem", "dirty-ring-size", "notify-vmexit", "notify-window",
                        "eager-split-size")}
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


def qemuopts_syntaxes() -> list[OptionSyntax]:
    """The QemuOpts options this command line reads, with the keys it parses (query-command-line-options)."""
    from pyvmm.sandbox import SANDBOX_SYNTAX

    machine_keys = ("type", "accel", "acpi", *_PC_PROPS_OFF_ONLY, *_PC_PROPS_ON_ONLY)
    return [OptionSyntax("machine", "type", machine_keys), ACCEL_SYNTAX, MEMORY_SYNTAX, SMP_SYNTAX, NAME_SYNTAX,
            MSG_SYNTAX, BOOT_SYNTAX, RTC_SYNTAX, ACTION_SYNTAX, DISPLAY_SYNTAX, MON_SYNTAX, CHARDEV_SYNTAX,
            DEVICE_SYNTAX, OptionSyntax("netdev", keys=None), compat_options.OBJECT_SYNTAX, AUDIODEV_SYNTAX,
            SANDBOX_SYNTAX, compat_options.OVERCOMMIT_SYNTAX, OptionSyntax("drive", keys=None)]


def _merged(args: RunArgs, name: str, syntax: OptionSyntax) -> Opts | None:
    """Repeated merge-list options (-m, -smp, -machine, -name, -msg, -boot, -rtc) as one, later keys winning."""
    texts = args.all(name)
    if not texts:
        return None
    merged: Opts | None = None
    for text in texts:
        opts = parse(syntax, text)
        if merged is None:
            merged = opts
        else:
            merged.values.update(opts.values)
            merged.help = merged.help or opts.help
    return merged


def _cannot(opts: Opts, what: str) -> ConfigError:
    return opts.error(f"pyvmm cannot honour {what}")


def _machine(args: RunArgs, cfg: MachineConfig, accels: list[str]) -> None:
    opts = _merged(args, "machine", MACHINE_SYNTAX)
    if opts is None:
        return
    mtype = opts.get_str("type", "pc") or "pc"
    if opts.help or mtype in ("help", "?"):
        raise _Exit(0, "Supported machines are:\npc                   Standard PC (i440FX-like, pyvmm)\n"
                       "none                 empty machine: a QMP monitor and no guest")
    if mtype not in ("pc", "none"):
        if mtype in ("q35", "isapc", "microvm", "xenfv", "xenpv", "x-remote") or mtype.startswith(("pc-", "q35")):
            raise _cannot(opts, f"machine type '{mtype}' (pyvmm has: pc, none)")
        raise opts.error(f"unsupported machine type '{mtype}' (pyvmm has: pc, none)")
    cfg.machine = mtype
    for key, value in opts.values.items():
        if key == "type":
            continue
        if key == "accel":
            accels.extend((opts.get_str("accel", "") or "").split(":"))
        elif key == "memory-backend":
            continue  # read by _memory_backend, once -object is parsed
        elif key == "acpi":
            if value == "auto":
                continue
            if not opts.get_bool("acpi"):
                cfg.acpi = False
        elif key in _PC_PROPS_OFF_ONLY:
            if opts.get_bool(key):
                raise _cannot(opts, f"{key}=on ({_PC_PROPS_OFF_ONLY[key]})")
        elif key in _PC_PROPS_ON_ONLY:
            if not opts.get_bool(key):
                raise _cannot(opts, f"{key}=off ({_PC_PROPS_ON_ONLY[key]})")
        else:
            raise opts.error(f"Property '{mtype}-machine.{key}' not found")


def _accels(args: RunArgs, accels: list[str]) -> None:
    for text in args.all("accel"):
        opts = parse(ACCEL_SYNTAX, text)
        name = opts.get_str("accel", "") or ""
        if opts.help or name in ("help", "?"):
            raise _Exit(0, "Accelerators supported in pyvmm:\nkvm\ntcg")
        if name not in ("kvm", "tcg", "auto"):
            raise opts.error(f"invalid accelerator {name}")
        for key in opts.values:
            if key == "accel":
                continue
            if key not in _ACCEL_PROPS.get(name, ()):
                raise opts.error(f"Property '{name}-accel.{key}' not found")
            if name == "tcg" and key == "thread" and opts.get_str(key) == "single":
                continue  # pyvmm's tcg runs one vCPU engine at a time
            if name == "kvm" and key == "kernel-irqchip" and opts.get_str(key) in ("on", "yes", "true", "y"):
                continue  # pyvmm's KVM uses the in-kernel irqchip
            raise _cannot(opts, f"{key}={opts.get(key)}")
        accels.append(name)
    accels.extend("kvm" for _ in args.all("enable-kvm"))


def _choose_accel(accels: list[str]) -> str:
    """QEMU tries the accelerators in order and takes the first that works; auto probes /dev/kvm."""
    accels = [a for a in accels if a]
    if not accels:
        return "auto"
    if len(accels) == 1:
        return accels[0]
    for name in accels:
        if name in ("tcg", "auto"):
            return name
        if name == "kvm" and os.access("/dev/kvm", os.R_OK | os.W_OK):
            return name
    return accels[-1]


def _memory(args: RunArgs) -> int:
    opts = _merged(args, "m", MEMORY_SYNTAX)
    if opts is None:
        return 512 << 20
    for key in ("slots", "maxmem"):
        if key in opts:
            raise _cannot(opts, f"{key}= (pyvmm has no memory hot-plug)")
    if "size" not in opts:
        raise opts.error("Parameter 'size' is missing")
    size = opts.get("size")
    if isinstance(size, str) and size.strip().startswith("-"):
        raise opts.error(f"Parameter 'size' expects a non-negative size, not {size!r}")
    if isinstance(size, str) and re.fullmatch(r"\s*[\d.]+[KMGTkmgt][Bb]\s*", size):
        size = size.strip()[:-1]  # pyvmm extension kept from its first parser: 128MB (QEMU: 128M only)
    return parse_size(size, "size", opts, default_suffix="M")


def _name(args: RunArgs, cfg: MachineConfig) -> str | None:
    """-name: returns the process name to set (process=)."""
    opts = _merged(args, "name", NAME_SYNTAX)
    if opts is None:
        return None
    cfg.name = opts.get_str("guest")
    cfg.debug_threads = opts.get_bool("debug-threads", False)
    return opts.get_str("process")


def _incoming(args: RunArgs) -> str | None:
    text = args.last("incoming")
    if text is None or text == "defer":
        return text
    from pyvmm.migration.uri import parse

    try:
        parse(text)
    except ConfigError as e:
        raise ConfigError(f"-incoming {text}: {e}") from None
    return text


def _uuid(args: RunArgs, cfg: MachineConfig) -> None:
    text = args.last("uuid")
    if text is None:
        return
    if not _UUID_RE.match(text):
        raise ConfigError(f"-uuid {text}: failed to parse UUID string: wrong format")
    cfg.uuid = text.lower()


def _display(args: RunArgs) -> None:
    for text in args.all("display"):
        opts = parse(DISPLAY_SYNTAX, text)
        kind = opts.get_str("type", "") or ""
        if kind.startswith("vnc") or "vnc" in opts:
            kind = "vnc"
        if kind not in _DISPLAYS:
            raise opts.error(f"Parameter 'type' does not accept value '{kind}'")
        if kind != "none":
            raise _cannot(opts, f"-display {kind} (pyvmm has no display; use -display none)")
        opts.check_keys(("type",))


@dataclass
class _MsgFormat:
    timestamp: bool = False
    guest_name: str | None = None


_MSG = _MsgFormat()


def _msg(args: RunArgs, guest: str | None) -> None:
    opts = _merged(args, "msg", MSG_SYNTAX)
    _MSG.timestamp = bool(opts and opts.get_bool("timestamp"))
    _MSG.guest_name = guest if opts and opts.get_bool("guest-name") else None


def _boot(args: RunArgs) -> BootConfig:
    opts = _merged(args, "boot", BOOT_SYNTAX)
    boot = BootConfig()
    if opts is None:
        return boot
    for key in ("splash", "splash-time", "reboot-timeout"):
        if key in opts:
            raise _cannot(opts, f"{key}= (pyvmm has no BIOS boot menu or splash screen)")

    def devices(key: str) -> str | None:
        text = opts.get_str(key)
        if text is None:
            return None
        seen: set[str] = set()
        for c in text:
            if not "a" <= c <= "p":
                raise opts.error(f"Invalid boot device '{c}'")
            if c in seen:
                raise opts.error(f"Boot device '{c}' was given twice")
            seen.add(c)
        return text

    boot.order = devices("order") or boot.order
    boot.once = devices("once")
    boot.menu = opts.get_bool("menu")
    boot.strict = opts.get_bool("strict")
    return boot


def _actions(args: RunArgs, cfg: MachineConfig) -> None:
    """QEMU's ``-action``: ``panic=``, ``reboot=`` and ``shutdown=poweroff`` are honoured, the rest refused."""
    opts = _merged(args, "action", ACTION_SYNTAX)
    if opts is None:
        return
    panic = opts.get_str("panic")
    if panic is not None:
        try:
            cfg.panic_action = PanicAction(panic)
        except ValueError:
            raise opts.error(f"invalid option value '{panic}' for panic "
                             "(pause, shutdown, exit-failure or none)") from None
    reboot = opts.get_str("reboot")
    if reboot is not None:
        if reboot not in ("reset", "shutdown"):
            raise opts.error(f"invalid option value '{reboot}' for reboot (reset or shutdown)")
        cfg.no_reboot = cfg.no_reboot or reboot == "shutdown"
    shutdown = opts.get_str("shutdown")
    if shutdown is not None and shutdown != "poweroff":
        raise _cannot(opts, f"shutdown={shutdown} (only poweroff)")
    if "watchdog" in opts:
        raise _cannot(opts, "watchdog= (pyvmm has no watchdog devices)")


def _rtc(args: RunArgs) -> str:
    opts = _merged(args, "rtc", RTC_SYNTAX)
    if opts is None:
        return "utc"
    base = opts.get_str("base", "utc") or "utc"
    if base not in ("utc", "localtime"):
        for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
            with contextlib.suppress(ValueError):
                time.strptime(base, fmt)
                break
        else:
            raise opts.error("invalid datetime format (valid formats: '2006-06-17T16:01:21' or '2006-06-17')")
    clock = opts.get_str("clock", "host")
    if clock not in ("host", "rt", "vm"):
        raise opts.error(f"invalid option value '{clock}'")
    if clock != "host":
        raise _cannot(opts, f"clock={clock} (the RTC follows the host clock)")
    drift = opts.get_str("driftfix", "none")
    if drift not in ("none", "slew"):
        raise opts.error(f"invalid option value '{drift}'")
    if drift != "none":
        raise _cannot(opts, "driftfix=slew")
    return base


def _devices(args: RunArgs) -> list[DeviceSpec]:
    specs: list[DeviceSpec] = []
    ids: set[str] = set()
    for text in args.all("device"):
        opts = parse(DEVICE_SYNTAX, text)
        if opts.help or opts.get("driver") in ("help", "?"):
            raise _Exit(0, _device_help())
        spec = DeviceSpec.from_opts(opts)
        _check_device(spec, opts)
        if spec.id is not None:
            if spec.id in ids:
                raise opts.error(f"Duplicate ID '{spec.id}' for device")
            ids.add(spec.id)
        specs.append(spec)
    return specs


def _check_device(spec: DeviceSpec, opts: Opts) -> None:
    """The driver and its properties, checked against the device registry before anything starts."""
    from pyvmm.devices import device_registry

    try:
        device_registry().lookup(spec.driver).resolve(spec.props, typed=spec.typed, ident=spec.id)
    except ConfigError as e:
        raise opts.error(str(e)) from None


def _device_help() -> str:
    """``-device help``: one line per driver, as QEMU lists them (aliases on the driver's line)."""
    from pyvmm.devices import device_registry

    reg = device_registry()
    aliases: dict[str, list[str]] = {}
    for name in reg.names():
        target = reg.lookup(name).name
        if target != name:
            aliases.setdefault(target, []).append(name)
    lines = []
    for t in reg.types():
        if t.user_creatable:
            alias = "".join(f', alias "{a}"' for a in aliases.get(t.name, ()))
            lines.append(f'name "{t.name}", bus {t.bus.value}{alias}, desc "{t.description}"')
    return "\n".join(lines)


def _chardevs(args: RunArgs) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in args.all("chardev"):
        cid, spec = chardev_from_opts(parse(CHARDEV_SYNTAX, text))
        if cid in out:
            raise ConfigError(f"-chardev {text}: Duplicate ID '{cid}' for chardev")
        out[cid] = spec
    return out


def _monitors(args: RunArgs, chardevs: dict[str, str]) -> list[str]:
    """-qmp specs, plus each ``-mon chardev=ID,mode=control`` on a listening -chardev socket."""
    qmp = list(args.all("qmp"))
    for text in args.all("monitor"):
        if text != "none":
            raise ConfigError(f"-monitor {text}: pyvmm cannot honour a human monitor "
                              "(use -qmp or -mon ...,mode=control)")
    for text in args.all("mon"):
        opts = parse(MON_SYNTAX, text)
        cid = opts.get_str("chardev", "") or ""
        if not cid:
            raise opts.error("Parameter 'chardev' is missing")
        if cid not in chardevs:
            raise opts.error(f'chardev "{cid}" not found')
        mode = opts.get_str("mode", "readline")
        if mode not in ("readline", "control"):
            raise opts.error(f"Parameter 'mode' does not accept value '{mode}'")
        if mode != "control":
            raise _cannot(opts, "mode=readline (pyvmm has no human monitor; use mode=control)")
        if opts.get_bool("pretty"):
            raise _cannot(opts, "pretty=on")
        spec = chardevs.pop(cid)
        if not spec.startswith(("unix:", "fd:")) or "server=on" not in spec:
            raise _cannot(opts, f"a monitor on chardev '{cid}' (only a listening socket: server=on)")
        qmp.append(spec)
    return qmp


def _memory_backend(args: RunArgs, cfg: MachineConfig) -> None:
    """-object memory-backend-*, then -machine memory-backend= or -numa node,memdev=: where RAM comes from."""
    backends = backends_from_args(args.all("object"))
    opts = _merged(args, "machine", MACHINE_SYNTAX)
    name = opts.get_str("memory-backend") if opts is not None else None
    backend = machine_backend(backends, name, args.all("numa"), cfg.memory if args.has("m") else None)
    if backend is not None:
        cfg.memory_backend = backend
        cfg.memory = backend.size


def _refused_backends(args: RunArgs) -> None:
    compat_options.parse_objects(args.all("object"))
    ids: set[str] = set()
    for text in args.all("audiodev"):
        opts = parse(AUDIODEV_SYNTAX, text)
        driver = opts.get("driver")
        if not driver:
            raise opts.error("Parameter 'driver' is missing")
        ident = opts.check_id()
        if ident is None:
            raise opts.error("Parameter 'id' is missing")
        if ident in ids:
            raise opts.error(f"Duplicate ID '{ident}' for audiodev")
        ids.add(ident)
        if driver != "none":
            raise _cannot(opts, f"-audiodev {driver} (pyvmm has no sound devices; only 'none')")
        opts.check_keys(("driver", "id"))


class _Exit(Exception):
    """``help`` asked for: print ``text`` and leave with ``status``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class ProcessOptions:
    """Options that shape the pyvmm process rather than the machine."""

    daemonize: bool = False
    pidfile: str | None = None
    process_name: str | None = None
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


def config_from_args(args: RunArgs) -> MachineConfig:
    return configure(args)[0]


def configure(args: RunArgs) -> tuple[MachineConfig, ProcessOptions]:
    """The machine and process configuration ``args`` ask for; any problem raises one ConfigError."""
    cfg = MachineConfig()
    proc = ProcessOptions()
    accels: list[str] = []
    _machine(args, cfg, accels)
    _accels(args, accels)
    cfg.accel = _choose_accel(accels)
    cfg.kernel = args.last("kernel")
    cfg.initrd = args.last("initrd")
    cfg.append = args.last("append") or ""
    cfg.memory = _memory(args)
    smp = _merged(args, "smp", SMP_SYNTAX)
    if smp is not None:
        cfg.topology = SmpConfig.from_opts(smp, machine=cfg.machine, max_cpus=MAX_SMP if cfg.machine == "pc" else 1)
    cfg.cpu = CpuConfig.parse(args.last("cpu", "host") or "host")
    proc.process_name = _name(args, cfg)
    _uuid(args, cfg)
    _display(args)
    _msg(args, cfg.name)
    cfg.boot = _boot(args)
    cfg.rtc_base = _rtc(args)
    cfg.no_reboot = args.has("no-reboot")
    cfg.no_shutdown = args.has("no-shutdown")
    compat_options.check_overcommit(args.all("overcommit"))
    compat_options.check_globals(args.all("global"))
    _actions(args, cfg)
    cfg.start_paused = args.has("S")
    cfg.incoming = _incoming(args)
    if args.has("no-acpi"):
        cfg.acpi = False
    cfg.devices = _devices(args)
    cfg.drives = [parse_drive(d) for d in args.all("drive")]
    if args.has("snapshot"):  # QEMU's -snapshot: snapshot=on for every -drive
        for drive in cfg.drives:
            drive.snapshot = True
    cfg.blockdevs = [node for text in args.all("blockdev") for node in parse_blockdev(text)]
    for drive in cfg.drives:  # QEMU opens every -drive at start, if=none ones too
        if not os.path.exists(drive.file):
            raise ConfigError(f"-drive file={escape(drive.file)}: Could not open '{drive.file}': "
                              "no such file")
    _unique_ids("drive", args.all("drive"), [d.id for d in cfg.drives])
    cfg.netdevs = [parse_netdev(n) for n in args.all("netdev")]
    _unique_ids("netdev", args.all("netdev"), [n.id for n in cfg.netdevs])
    cfg.chardevs = _chardevs(args)
    cfg.qmp = _monitors(args, cfg.chardevs)
    _refused_backends(args)
    _memory_backend(args, cfg)
    cfg.mem_path = args.last("mem-path")
    cfg.mem_prealloc = args.has("mem-prealloc")
    if cfg.mem_path and cfg.memory_backend is not None:
        raise ConfigError("-mem-path: cannot be used with a memory backend (-machine memory-backend= "
                          "or -numa node,memdev=)")
    proc.daemonize = args.has("daemonize")
    proc.pidfile = args.last("pidfile")
    proc.sandbox = parse_sandbox(args.all("sandbox"))
    if proc.sandbox.enabled and not sandbox_available():
        raise ConfigError("-sandbox on: libseccomp's Python bindings are missing "
                          "(Debian: apt-get install python3-seccomp; then scripts/bootstrap)")
    serials = args.all("serial")
    if len(serials) > 1:
        raise ConfigError(f"-serial {serials[1]}: pyvmm cannot honour a second serial port (it has COM1 only)")
    if serials:
        cfg.serial = serials[0]
        try:
            parse_spec(cfg.serial)
        except ConfigError as e:
            raise ConfigError(f"-serial {cfg.serial}: {e}") from None
    elif args.has("nodefaults") or proc.daemonize:
        cfg.serial = "none"  # QEMU's -nodefaults: no serial port; -daemonize: not the terminal
    if proc.daemonize and cfg.serial.startswith(("stdio", "mon:stdio")):
        raise ConfigError(f"-daemonize: -serial {cfg.serial} cannot be used with -daemonize (it needs the terminal)")
    _check_socket_paths(cfg)
    if cfg.machine == "none":
        for name in ("kernel", "initrd", "append", "device", "drive", "netdev", "blockdev"):
            if args.has(name):
                raise ConfigError(f"-{name}: -machine none has no guest (no kernel, no buses)")
    cfg.validate()
    return cfg, proc


def _unique_ids(option: str, texts: list[str], ids: list[str | None]) -> None:
    """QEMU's "Duplicate ID" refusal, up front (before any back-end is opened)."""
    seen: set[str] = set()
    for text, ident in zip(texts, ids, strict=True):
        if not ident:
            continue
        if ident in seen:
            raise ConfigError(f"-{option} {text}: Duplicate ID '{ident}' for {option}")
        seen.add(ident)


def _check_socket_paths(cfg: MachineConfig) -> None:
    """Each listening Unix socket path is used once (-qmp, -chardev socket, -serial unix:, -mon).

    QEMU lets a second listener unlink and steal the path of the first, which then can never be
    reached; pyvmm refuses the configuration instead.
    """
    from pyvmm.monitor.server import MonitorSpec

    listeners: list[tuple[str, str]] = []  # (path, the option that listens there)
    for text in cfg.qmp:
        spec = MonitorSpec.parse(text)
        if spec.kind == "unix":
            listeners.append((spec.path, f"-qmp {text}"))
    for cid, text in cfg.chardevs.items():
        kind, path, opts = parse_spec(text)
        if kind == "unix" and opts.get("server", False):
            listeners.append((path, f"-chardev id={cid}"))
    if cfg.serial:
        kind, path, opts = parse_spec(cfg.serial)
        if kind == "unix" and opts.get("server", False):
            listeners.append((path, f"-serial {cfg.serial}"))
    seen: dict[str, str] = {}
    for path, where in listeners:
        key = os.path.abspath(path)
        if key in seen:
            raise ConfigError(f"{where}: socket path {path} is already used by {seen[key]}")
        seen[key] = where


# -- running ----------------------------------------------------------------------------------------

class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _prefix() + super().format(record)


def _prefix() -> str:
    out = ""
    if _MSG.timestamp:
        now = time.time()
        out += time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z "
    if _MSG.guest_name:
        out += f"{_MSG.guest_name} "
    return out


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.INFO if verbose == 0 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("pyvmm: %(message)s" if verbose < 2 else
                                    "%(relativeCreated)8.0f %(threadName)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _exit_on_signals(control: VmControl) -> None:
    """SIGTERM/SIGHUP end the VM as QEMU does: a clean shutdown (terminal restored, SHUTDOWN event), status 0."""

    def on_signal(signum: int, _frame: object) -> None:
        log.warning("terminating on signal %d", signum)
        control.request_exit(0, "host-signal")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


@contextlib.contextmanager
def _pidfile(path: str | None) -> Iterator[None]:
    """QEMU's -pidfile: the file holds our pid and stays locked while we run; removed at exit."""
    if path is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError(f"-pidfile {path}: cannot open: {e.strerror}") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"-pidfile {path}: locked by another process (is a VM already running?)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _daemonize() -> Callable[[], None]:
    """Fork into the background, as QEMU's -daemonize: the parent exits 0 once the child calls
    the returned ``ready()``, or 1 if the child dies first (its error went to our stderr)."""
    rfd, wfd = os.pipe()
    if os.fork():
        os.close(wfd)
        status = 0 if os.read(rfd, 1) == b"\0" else 1
        os._exit(status)
    os.close(rfd)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # now: -sandbox forbids opening it for writing later

    def ready() -> None:
        nonlocal wfd
        if wfd < 0:
            return
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
        os.write(wfd, b"\0")
        os.close(wfd)
        wfd = -1

    return ready


def _set_process_name(name: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def cmd_run(args: RunArgs) -> int:
    cfg, proc = configure(args)
    if proc.process_name:
        _set_process_name(proc.process_name)
    ready = _daemonize() if proc.daemonize else None
    with _pidfile(proc.pidfile):
        return _run_machine(cfg, args, ready, proc.sandbox)


def _run_machine(cfg: MachineConfig, args: RunArgs, ready: Callable[[], None] | None,
                 sandbox: SandboxConfig | None = None) -> int:
    from pyvmm.accel import select

    control = VmControl()
    if cfg.machine == "none":
        from pyvmm.machine.none import NoneMachine

        _exit_on_signals(control)
        empty = NoneMachine(cfg, control=control, sandbox=sandbox)
        if ready is not None:
            empty.state_listeners.append(lambda _s, _r: ready())
        return empty.run().status
    if cfg.kernel is None:
        from pyvmm.guestkit import default_guest

        guest = default_guest()
        cfg.kernel = str(guest.kernel)
        cfg.initrd = cfg.initrd or str(guest.initrd)
        if args.append is None:
            cfg.append = guest.cmdline
    if "pyvmm_run=" in cfg.append and not any(d.driver == "pyvmm-exit-status" for d in cfg.devices):
        cfg.devices.append(DeviceSpec("pyvmm-exit-status"))  # the command's status becomes ours
    if not os.path.exists(cfg.kernel):
        raise ConfigError(f"kernel {cfg.kernel}: no such file")
    if not os.path.isfile(cfg.kernel):
        raise ConfigError(f"kernel {cfg.kernel}: not a regular file")
    choice = select.choose(cfg.accel)
    log.info("accelerator: %s (%s)", choice.name, choice.reason)

    from pyvmm.machine.pc import PcMachine

    _exit_on_signals(control)  # before the machine: its stdio back-end then leaves these signals to us
    machine = PcMachine(cfg, accel_name=choice.name, accel_reason=choice.reason, control=control,
                        sandbox=sandbox)
    if ready is not None:
        machine.state_listeners.append(lambda _s, _r: ready())  # set up: the parent may exit
    result = machine.run()
    if result.status:
        log.info("exit status %d: %s", result.status, result.reason)
    else:
        log.debug("guest stopped: %s", result.reason)
    return result.status


# -- the top level ----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


class CommandLine:
    """``pyvmm [--version] COMMAND ...``: ``run`` reads QEMU's grammar, ``vm`` is argparse's."""

    def __init__(self) -> None:
        self.argparser = _Parser(prog="pyvmm", description="A hackable virtual machine monitor in Python.",
                                 allow_abbrev=False)
        self.argparser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
        sub = self.argparser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
        sub.add_parser("run", help="boot one VM in this process (QEMU's options; pyvmm run -help)", add_help=False)
        sub.add_parser("exec", help="boot the default guest, run a command in it, exit with its status "
                                    "(pyvmm exec [run options] -- CMD [ARGS...])", add_help=False)
        from pyvmm.manager.cli import add_vm_parser

        add_vm_parser(sub)

    def parse_args(self, argv: list[str] | None = None) -> Any:
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv and argv[0] == "run":
            return parse_run_args(argv[1:])
        return self.argparser.parse_args(argv)

    def print_help(self) -> None:
        self.argparser.print_help()


def build_parser() -> CommandLine:
    return CommandLine()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "exec":  # pyvmm exec [run options] -- CMD: the SDK's own command line
        from pyvmm.sdk.exec_cli import main_exec

        _setup_logging(0, True)
        return main_exec(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "run":
            if args.has("help"):
                print(run_help())
                return 0
            if args.has("version"):
                print(f"pyvmm {__version__}")
                return 0
        _setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
        if args.command == "run":
            return cmd_run(args)
        if args.command == "vm":
            from pyvmm.manager.cli import cmd_vm

            return cmd_vm(args)
        raise ConfigError(f"unknown command {args.command}")
    except _Exit as e:
        print(e.text)
        return e.status
    except PyvmmError as e:
        print(f"{_prefix()}pyvmm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
