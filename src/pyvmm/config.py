"""What ``pyvmm run`` was asked to build, as typed data: the machine, its CPUs, its devices.

The command line (:mod:`pyvmm.cli`) reads options with :mod:`pyvmm.qemuopts` and fills these
dataclasses; the builder (:mod:`pyvmm.machine.pc`) and the accelerators read them.  Nothing
here touches the host: checks that need files or devices happen where those are opened.

Bottom floor: imports only :mod:`pyvmm.errors` and :mod:`pyvmm.qemuopts`.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmm.errors import ConfigError
from pyvmm.memory import RamBackend
from pyvmm.qemuopts import OptionSyntax, Opts, Value, escape, parse, parse_int
from pyvmm.runstate import PanicAction

MAX_SMP = 254  # APIC ids 0..253, with the I/O APIC at id N (MP table, MADT)
MACHINE_TYPES = ("pc", "none")


# -- CPUs ------------------------------------------------------------------------------------------

@dataclass
class CpuConfig:
    """``-cpu`` model and feature edits, e.g. ``host,-cx16,+x2apic``."""

    model: str = "host"
    enable: list[str] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> CpuConfig:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ConfigError("-cpu needs a model name, e.g. 'host'")
        cfg = cls(model=parts[0])
        for p in parts[1:]:
            if p.startswith("-"):
                cfg.disable.append(p[1:])
            elif p.startswith("+"):
                cfg.enable.append(p[1:])
            elif p.endswith("=off"):
                cfg.disable.append(p[:-4])
            elif p.endswith("=on"):
                cfg.enable.append(p[:-3])
            else:
                raise ConfigError(f"-cpu {text}: cannot parse feature {p!r} (use +feat or -feat)")
        return cfg


SMP_SYNTAX = OptionSyntax("smp", implied="cpus",
                          keys=("cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus"))


@dataclass(frozen=True)
class SmpConfig:
    """``-smp`` topology, with the missing values filled in as QEMU 7.2 fills them.

    ``cpus`` vCPUs are present at start; ``maxcpus`` = sockets * dies * clusters * cores * threads.
    """

    cpus: int = 1
    sockets: int = 1
    dies: int = 1
    clusters: int = 1
    cores: int = 1
    threads: int = 1
    maxcpus: int = 1

    @classmethod
    def parse(cls, text: str, *, machine: str = "pc", max_cpus: int = MAX_SMP) -> SmpConfig:
        return cls.from_opts(parse(SMP_SYNTAX, text), machine=machine, max_cpus=max_cpus)

    @classmethod
    def from_opts(cls, opts: Opts, *, machine: str = "pc", max_cpus: int = MAX_SMP) -> SmpConfig:
        given: dict[str, int] = {}
        for key in SMP_SYNTAX.keys or ():
            if key in opts:
                value = parse_int(opts.get(key), key, opts)
                if value < 0:
                    raise opts.error(f"Parameter '{key}' expects a non-negative integer")
                if value == 0:  # QEMU 7.2 still takes 0 as "unset", deprecated; we refuse it
                    raise opts.error("CPU topology parameters must be greater than zero")
                given[key] = value
        return cls.resolve(opts, machine=machine, max_cpus=max_cpus, **given)

    @classmethod
    def resolve(cls, opts: Opts | None = None, *, machine: str = "pc", max_cpus: int = MAX_SMP,
                cpus: int = 0, sockets: int = 0, dies: int = 0, clusters: int = 0, cores: int = 0,
                threads: int = 0, maxcpus: int = 0) -> SmpConfig:
        """QEMU's ``machine_parse_smp_config`` (x86: dies yes, clusters no; cores preferred)."""

        def error(msg: str) -> ConfigError:
            return opts.error(msg) if opts is not None else ConfigError(f"-smp: {msg}")

        if clusters > 1:
            raise error("clusters not supported by this machine's CPU topology")
        dies = dies or 1
        clusters = clusters or 1
        if cpus == 0 and maxcpus == 0:
            sockets, cores, threads = sockets or 1, cores or 1, threads or 1
        else:
            maxcpus = maxcpus or cpus
            if cores == 0:  # prefer cores over sockets (machine types since 6.2)
                sockets, threads = sockets or 1, threads or 1
                cores = maxcpus // (sockets * dies * clusters * threads)
            elif sockets == 0:
                threads = threads or 1
                sockets = maxcpus // (dies * clusters * cores * threads)
            if threads == 0:
                threads = maxcpus // (sockets * dies * clusters * cores)
        maxcpus = maxcpus or sockets * dies * clusters * cores * threads
        cpus = cpus or maxcpus
        hierarchy = f"sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads})"
        if sockets * dies * clusters * cores * threads != maxcpus:
            raise error(f"Invalid CPU topology: product of the hierarchy must match maxcpus: "
                        f"{hierarchy} != maxcpus ({maxcpus})")
        if maxcpus < cpus:
            raise error(f"Invalid CPU topology: maxcpus must be equal to or greater than smp: "
                        f"{hierarchy} == maxcpus ({maxcpus}) < smp_cpus ({cpus})")
        if maxcpus > max_cpus:
            raise error(f"Invalid SMP CPUs {maxcpus}. The max CPUs supported by machine '{machine}' is {max_cpus}")
        return cls(cpus, sockets, dies, clusters, cores, threads, maxcpus)


# -- devices ---------------------------------------------------------------------------------------

DEVICE_SYNTAX = OptionSyntax("device", implied="driver", json=True)


@dataclass
class DeviceSpec:
    """One ``-device DRIVER[,prop=value...]`` or ``-device {"driver": ..., ...}``.

    ``props`` holds every property but ``driver`` as given: strings from QemuOpts syntax,
    typed values where JSON gave types.  Nothing here checks them against the driver: the
    device registry converts them with each driver's typed schema.  ``props`` still carries
    ``id`` too, for the boards that read it from there; ``id`` is the checked identifier.
    """

    driver: str
    props: dict[str, Value] = field(default_factory=dict)
    id: str | None = None
    text: str = ""  # the option argument, for error messages
    typed: bool = False  # JSON syntax: values keep their JSON types and must have the right one

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        return cls.from_opts(parse(DEVICE_SYNTAX, text))

    @classmethod
    def from_opts(cls, opts: Opts) -> DeviceSpec:
        driver = opts.get("driver")
        if not isinstance(driver, str) or not driver:
            raise opts.error("Parameter 'driver' is missing")
        ident = opts.check_id() if not opts.from_json else _json_id(opts)
        props = {k: v for k, v in opts.values.items() if k != "driver"}
        return cls(driver, props, ident, opts.text, opts.from_json)

    def int_prop(self, key: str, default: int) -> int:
        if key not in self.props:
            return default
        opts = Opts("device", self.text or self.driver, self.props, from_json=self.typed)
        if self.typed and not isinstance(self.props[key], int):  # JSON: "0xf4" is a string, not a number
            raise opts.error(f"Parameter '{key}' expects integer")
        return parse_int(self.props[key], key, opts)


def _json_id(opts: Opts) -> str | None:
    """QEMU 7.2 takes a JSON ``id`` only when it is a string (other types leave the device anonymous)."""
    if not isinstance(opts.get("id"), str):
        opts.values.pop("id", None)
        return None
    return opts.check_id()


# -- character devices (``-chardev``) ------------------------------------------------------------------

CHARDEV_SYNTAX = OptionSyntax("chardev", implied="backend")


def parse_chardev_option(text: str) -> tuple[str, str]:
    """QEMU's ``-chardev BACKEND,id=ID[,path=P][,server=on][,wait=off]`` as (id, pyvmm chardev spec).

    Devices then name it: ``-device virtio-console,chardev=ID``.
    """
    return chardev_from_opts(parse(CHARDEV_SYNTAX, text))


def chardev_from_opts(opts: Opts) -> tuple[str, str]:
    backend = opts.get_str("backend", "") or ""
    if not backend:
        raise opts.error("a back-end is needed: socket, file, stdio, pty or null")
    props = {k: v for k, v in opts.values.items() if k != "backend"}
    cid = props.pop("id", "")
    if not cid:
        raise opts.error("an id=NAME is required")
    opts.check_id()
    path = props.pop("path", "")
    if backend == "socket" and "fd" in props:  # a listening socket the parent bound (libvirt's monitor)
        fd = props.pop("fd")
        if path or not str(fd).isdigit():
            raise opts.error("fd= takes a file descriptor number, and no path=")
        for key in props:
            if key not in ("server", "wait"):
                raise opts.error(f"Invalid parameter '{key}'")
        if not opts.get_bool("server", False):
            raise opts.error("fd=: pyvmm takes only a listening socket (server=on)")
        wait = "on" if opts.get_bool("wait", True) else "off"
        return cid, f"fd:{fd},server=on,wait={wait}"
    if backend == "socket":
        if not path:
            raise opts.error("path=PATH is required (unix sockets only)")
        for key in props:
            if key not in ("server", "wait"):
                raise opts.error(f"Invalid parameter '{key}'")
        extra = "".join(f",{k}={'on' if opts.get_bool(k) else 'off'}" for k in props)
        return cid, f"unix:{escape(path)}{extra}"
    if backend == "file":
        if not path:
            raise opts.error("path=PATH is required")
        opts.check_keys(("backend", "id", "path"))
        return cid, f"file:{escape(path)}"
    if backend in ("stdio", "pty", "null"):
        if props or path:
            raise opts.error(f"Invalid parameter '{next(iter(props), 'path')}'")
        return cid, backend
    raise opts.error(f"unknown back-end '{backend}' (use socket, file, stdio, pty or null)")


# -- the machine -----------------------------------------------------------------------------------

@dataclass
class BootConfig:
    """``-boot``: accepted and checked as QEMU does; with ``-kernel`` the kernel boots first anyway."""

    order: str = "cad"
    once: str | None = None
    menu: bool = False
    strict: bool = False


@dataclass
class MachineConfig:
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    memory: int = 512 << 20
    topology: SmpConfig = field(default_factory=SmpConfig)
    accel: str = "auto"
    cpu: CpuConfig = field(default_factory=CpuConfig)
    serial: str = "stdio"
    no_reboot: bool = False
    devices: list[DeviceSpec] = field(default_factory=list)
    drives: list = field(default_factory=list)  # pyvmm.devices.virtio.options.DriveSpec (-drive)
    blockdevs: list = field(default_factory=list)  # pyvmm.block.blockdev.NodeOptions (-blockdev), in order
    netdevs: list = field(default_factory=list)  # pyvmm.net.options.NetdevSpec (-netdev)
    chardevs: dict[str, str] = field(default_factory=dict)  # -chardev id -> pyvmm.chardev spec
    mem_path: str | None = None
    memory_backend: RamBackend | None = None  # -machine memory-backend= / -numa node,memdev=: RAM's source
    mem_prealloc: bool = False  # -mem-prealloc: every page of guest RAM backed at start
    qmp: list[str] = field(default_factory=list)
    machine: str = "pc"  # -machine type: pc, or none (a monitor and no guest)
    name: str | None = None  # -name guest=
    uuid: str | None = None  # -uuid, canonical lower-case form
    start_paused: bool = False  # -S: vCPUs wait for QMP 'cont'
    incoming: str | None = None  # -incoming URI|defer: load a migration stream instead of booting
    panic_action: PanicAction = PanicAction.SHUTDOWN  # -action panic=
    acpi: bool = True  # -no-acpi clears it
    rtc_base: str = "utc"  # -rtc base=utc|localtime|YYYY-MM-DD[THH:MM:SS]
    boot: BootConfig = field(default_factory=BootConfig)
    no_shutdown: bool = False  # -no-shutdown: a guest power-off stops the vCPUs; the process stays
    debug_threads: bool = False  # -name debug-threads=on: vCPU threads are named "CPU N/KVM" or "CPU N/TCG"

    @property
    def smp(self) -> int:
        """vCPUs present at start (``-smp cpus=``)."""
        return self.topology.cpus

    def rtc_clock(self) -> Callable[[], float]:
        """The RTC's time source for ``-rtc base=``: seconds since the epoch, read as UTC by the RTC."""
        if self.rtc_base == "utc":
            return time.time
        if self.rtc_base == "localtime":
            return lambda: time.time() + time.localtime().tm_gmtoff
        for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
            try:
                start = calendar.timegm(time.strptime(self.rtc_base, fmt))
                break
            except ValueError:
                continue
        else:
            raise ConfigError(f"-rtc base={self.rtc_base}: invalid datetime format "
                              "(valid formats: '2006-06-17T16:01:21' or '2006-06-17')")
        offset = start - time.time()
        return lambda: time.time() + offset

    def validate(self) -> None:
        if self.machine not in MACHINE_TYPES:
            raise ConfigError(f"-machine {self.machine}: unsupported machine type (pyvmm has: pc, none)")
        if not 1 <= self.smp <= MAX_SMP:
            raise ConfigError(f"-smp {self.smp}: must be between 1 and {MAX_SMP}")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"-accel {self.accel}: must be kvm, tcg or auto")
        if self.memory < (2 << 20):
            raise ConfigError(f"-m {_human(self.memory)}: at least 2 MiB of memory is needed")
        if self.memory % 4096:
            raise ConfigError(f"-m {self.memory} bytes: memory must be a multiple of 4 KiB")


def _human(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= (1 << shift) and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size} bytes"


__all__ = ["BootConfig", "CHARDEV_SYNTAX", "CpuConfig", "DEVICE_SYNTAX", "DeviceSpec", "MACHINE_TYPES", "MAX_SMP",
           "MachineConfig", "SMP_SYNTAX", "SmpConfig", "chardev_from_opts", "parse_chardev_option"]
