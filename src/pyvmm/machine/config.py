"""Machine configuration: what ``pyvmm run`` was asked to build, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvmm.accel.base import CpuConfig
from pyvmm.errors import ConfigError
from pyvmm.runstate import PanicAction

MAX_SMP = 254  # APIC ids 0..253, with the I/O APIC at id N (MP table, MADT)


@dataclass
class DeviceSpec:
    """A ``--device DRIVER[,key=value...]`` option."""

    driver: str
    props: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        parts = [p for p in text.split(",") if p]
        if not parts:
            raise ConfigError("--device needs a driver name")
        props: dict[str, str] = {}
        for p in parts[1:]:
            if "=" not in p:
                raise ConfigError(f"--device {parts[0]}: property {p!r} is not key=value")
            k, v = p.split("=", 1)
            props[k.strip()] = v.strip()
        return cls(parts[0].strip(), props)

    def int_prop(self, key: str, default: int) -> int:
        if key not in self.props:
            return default
        try:
            return int(self.props[key], 0)
        except ValueError:
            raise ConfigError(f"--device {self.driver}: {key}={self.props[key]!r} is not a number") from None


@dataclass
class MachineConfig:
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    memory: int = 512 << 20
    smp: int = 1
    accel: str = "auto"
    cpu: CpuConfig = field(default_factory=CpuConfig)
    serial: str = "stdio"
    no_reboot: bool = False
    devices: list[DeviceSpec] = field(default_factory=list)
    drives: list = field(default_factory=list)  # pyvmm.devices.virtio.options.DriveSpec (--drive)
    netdevs: list = field(default_factory=list)  # pyvmm.net.options.NetdevSpec (--netdev)
    chardevs: dict[str, str] = field(default_factory=dict)  # --chardev id -> pyvmm.chardev spec
    mem_path: str | None = None
    qmp: list[str] = field(default_factory=list)
    panic_action: PanicAction = PanicAction.SHUTDOWN  # -action panic=

    def validate(self) -> None:
        if not 1 <= self.smp <= MAX_SMP:
            raise ConfigError(f"--smp {self.smp}: must be between 1 and {MAX_SMP}")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"--accel {self.accel}: must be kvm, tcg or auto")
        if self.memory < (2 << 20):
            raise ConfigError(f"--memory {_human(self.memory)}: at least 2 MiB is needed")
        if self.memory % 4096:
            raise ConfigError(f"--memory {self.memory} bytes: must be a multiple of 4 KiB")


def _human(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= (1 << shift) and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size} bytes"


def parse_action_option(text: str, cfg: MachineConfig) -> None:
    """QEMU's ``-action KEY=VALUE[,...]``: ``panic=``, ``reboot=`` and ``shutdown=poweroff`` are honoured."""
    for item in (p for p in text.split(",") if p):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"-action {text}: {item!r} is not key=value")
        if key == "panic":
            try:
                cfg.panic_action = PanicAction(value)
            except ValueError:
                raise ConfigError(f"-action panic={value}: must be pause, shutdown, exit-failure or none") from None
        elif key == "reboot" and value in ("reset", "shutdown"):
            cfg.no_reboot = value == "shutdown"
        elif key == "shutdown" and value == "poweroff":
            pass
        elif key in ("reboot", "shutdown", "watchdog"):
            raise ConfigError(f"-action {key}={value}: not supported by pyvmm "
                              f"(supported: panic=..., reboot=reset|shutdown, shutdown=poweroff)")
        else:
            raise ConfigError(f"-action: unknown action {key!r} (known: panic, reboot, shutdown, watchdog)")


def parse_chardev_option(text: str) -> tuple[str, str]:
    """QEMU's ``-chardev BACKEND,id=ID[,path=P][,server=on][,wait=off]`` as (id, pyvmm chardev spec).

    Devices then name it: ``--device virtio-console,chardev=ID``.
    """
    parts = [p for p in text.split(",") if p]
    if not parts:
        raise ConfigError("--chardev needs a back-end: socket, file, stdio, pty or null")
    backend, props = parts[0], {}
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        if not eq:
            raise ConfigError(f"--chardev {backend}: property {p!r} is not key=value")
        props[key] = value
    cid = props.pop("id", "")
    if not cid:
        raise ConfigError(f"--chardev {backend}: an id=NAME is required")
    path = props.pop("path", "")
    if backend == "socket":
        if not path:
            raise ConfigError(f"--chardev socket,id={cid}: path=PATH is required (unix sockets only)")
        extra = "".join(f",{k}={v}" for k, v in props.items())
        return cid, f"unix:{path}{extra}"
    if backend == "file":
        if not path:
            raise ConfigError(f"--chardev file,id={cid}: path=PATH is required")
        return cid, f"file:{path}"
    if backend in ("stdio", "pty", "null"):
        if props or path:
            raise ConfigError(f"--chardev {backend},id={cid}: unknown properties {', '.join(props) or 'path'}")
        return cid, backend
    raise ConfigError(f"--chardev {backend}: unknown back-end (use socket, file, stdio, pty or null)")
