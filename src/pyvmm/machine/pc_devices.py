"""The PC's device wiring: :class:`pyvmm.qdev.DeviceContext` over its buses and back-ends.

Factories in the device modules ask this for what they need: the port bus, an interrupt
line, the virtio iothread, a transport (virtio-pci on the PCI host, or a virtio-mmio
window), and the back-ends the user gave ids to.  Each ``-drive`` and ``-netdev`` serves
one device; what is left unused is reported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from pyvmm.block.graph import Backend
from pyvmm.block.setup import build_block_graph
from pyvmm.chardev import parse_chardev
from pyvmm.chardev.parse import parse_spec
from pyvmm.config import DeviceSpec, MachineConfig
from pyvmm.devices import device_registry
from pyvmm.devices.pci.board import PciBoard
from pyvmm.devices.virtio.board import VirtioMmioBoard
from pyvmm.devices.virtio.options import DriveSpec
from pyvmm.errors import ConfigError
from pyvmm.irq import IrqLine
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.net.backends import open_backend
from pyvmm.net.options import NetdevSpec
from pyvmm.qdev import Device, DeviceManager
from pyvmm.runstate import VmControl

log = logging.getLogger(__name__)


class PcDevices:
    """Creates the PC's devices through the registry and keeps them in its device tree."""

    def __init__(self, config: MachineConfig, *, memory: GuestMemory, control: VmControl, main_loop: MainLoop,
                 irq_line: Callable[[int], IrqLine], add_io: Callable[[int, int, object, str], None],
                 virtio: VirtioMmioBoard, pci: PciBoard) -> None:
        self._config = config
        self._memory = memory
        self._control = control
        self._main_loop = main_loop
        self._irq_line = irq_line
        self._add_io = add_io
        self.virtio = virtio
        self.pci = pci
        self._builtin_chardevs: dict[str, str] = {}
        self._chardevs: list[tuple[str, str, Any]] = []  # (label, spec, back-end) in creation order
        self._drives = _drives_by_id(config.drives)
        self.block = build_block_graph(config.blockdevs, self._drives)
        self._netdevs = _netdevs_by_id(config.netdevs)
        self._used: set[tuple[str, str]] = set()  # ("drive"|"netdev", id)
        self._bootindexes: set[int] = set()
        self._board_wiring = False
        self.manager = DeviceManager(device_registry(), self)

    # -- what the machine builder calls ----------------------------------------------------------
    def add_user_device(self, spec: DeviceSpec) -> Device:
        """One ``-device``; its errors name the option."""
        try:
            dev = self.manager.create(spec.driver, spec.props, ident=spec.id, typed=spec.typed)
            bootindex = dev.props.get("bootindex") if dev.props is not None else None
            if bootindex is not None:  # QEMU's boot order: each index once (pyvmm boots -kernel)
                if bootindex in self._bootindexes:
                    raise ConfigError(f"The bootindex {bootindex} has already been used")
                self._bootindexes.add(bootindex)
            return dev
        except ConfigError as e:
            raise ConfigError(f"-device {spec.text or spec.driver}: {e}") from None

    def add_board_device(self, driver: str, props: dict[str, Any]) -> Device:
        """A device the board itself creates (the -serial port, an if=virtio disk)."""
        with self._board():
            return self.manager.create(driver, props, user=False)

    def add_serial(self, spec: str) -> Device:
        """``-serial SPEC``: an isa-serial on the next COM port, its back-end the chardev serialN."""
        name = f"serial{self.manager.tree.count('isa-serial')}"
        self._builtin_chardevs[name] = spec
        return self.add_board_device("isa-serial", {"chardev": name})

    def add_drives(self) -> None:
        """Each ``-drive if=virtio`` becomes a virtio-blk on virtio-mmio (if=none waits for a device)."""
        for ident, drive in self._drives.items():
            if drive.interface == "virtio":
                try:
                    self.add_board_device("virtio-blk-device", {"drive": ident})
                except ConfigError as e:
                    raise ConfigError(f"--drive {drive.file}: {e}") from None

    def check_unused(self) -> None:
        for ident in sorted(set(self._netdevs) - {i for kind, i in self._used if kind == "netdev"}):
            log.warning("--netdev %s is not used by any device", ident)

    @contextlib.contextmanager
    def _board(self) -> Iterator[None]:
        self._board_wiring = True
        try:
            yield
        finally:
            self._board_wiring = False

    # -- pyvmm.qdev.DeviceContext ----------------------------------------------------------------
    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def control(self) -> VmControl:
        return self._control

    @property
    def iothread(self) -> MainLoop:
        return self.virtio.loop

    def irq_line(self, gsi: int) -> IrqLine:
        return self._irq_line(gsi)

    def add_io(self, base: int, size: int, handler: object, name: str) -> None:
        self._add_io(base, size, handler, name)

    def add_mmio(self, base: int, size: int, handler: object, name: str) -> None:
        self.virtio.mmio_bus.register(base, size, handler, name)  # type: ignore[arg-type]

    def chardev(self, ident: str) -> Any:
        if self._board_wiring and ident in self._builtin_chardevs:
            spec, label = self._builtin_chardevs[ident], ident
        else:  # a -chardev id, or (pyvmm's shorthand) a back-end spec itself
            spec = self._config.chardevs.get(ident, ident)
            label = ident if ident in self._config.chardevs else "chardev"
        backend = parse_chardev(spec, self._main_loop, self._control, label=label)
        if backend is not None:
            self._chardevs.append((label, spec, backend))
        return backend

    def chardev_filenames(self) -> list[tuple[str, str]]:
        """(label, filename) of each back-end in use, as QMP query-chardev names them (pty:/dev/pts/N)."""
        out = []
        for label, spec, backend in self._chardevs:
            path = getattr(backend, "path", None)
            kind = spec.split(":", 1)[0].split(",", 1)[0]
            out.append((label, f"pty:{path}" if kind == "pty" and path else spec))
        return out

    def chardev_socket_path(self, ident: str) -> str:
        spec = self._config.chardevs.get(ident)
        if spec is None:
            raise ConfigError(f"Property 'chardev' can't find value '{ident}' (no -chardev id={ident})")
        kind, path, flags = parse_spec(spec)
        if kind != "unix":
            raise ConfigError(f"chardev '{ident}' is not a socket (vhost-user needs -chardev socket,path=...)")
        if flags.get("server", False):
            raise ConfigError(f"chardev '{ident}': pyvmm cannot honour server=on for vhost-user "
                              "(it connects to the back end's socket)")
        self._claim("chardev", ident)
        return path

    def drive(self, ident: str) -> DriveSpec:
        drive = self._drives.get(ident)
        if drive is None:
            raise ConfigError(f"Property 'drive' can't find value '{ident}' (no -drive id={ident})")
        if drive.interface != "none" and not self._board_wiring:
            raise ConfigError(f"-drive id={ident} has if={drive.interface}, so it is already a disk of its own "
                              "(give it if=none)")
        self._claim("drive", ident)
        return drive

    def block_backend(self, ident: str | None, *, read_only: bool, share_rw: bool, device_id: str | None,
                      file: str | None = None, fmt: str | None = None) -> Backend:
        qdev = self.manager.tree.next_path(device_id, user=not self._board_wiring) + "/virtio-backend"
        if ident is None:
            assert file is not None
            return self.block.attach_file(file, fmt, read_only=read_only, share_rw=share_rw, qdev=qdev)
        drive = self._drives.get(ident)
        if drive is not None and drive.interface != "none" and not self._board_wiring:
            raise ConfigError(f"-drive id={ident} has if={drive.interface}, so it is already a disk of its own "
                              "(give it if=none)")
        return self.block.attach(ident, read_only=read_only, share_rw=share_rw, qdev=qdev)

    def netdev(self, ident: str) -> Any:
        spec = self._netdevs.get(ident)
        if spec is None:
            raise ConfigError(f"Property 'netdev' can't find value '{ident}' (no -netdev id={ident})")
        self._claim("netdev", ident)
        log.info("netdev %s: %s back-end", ident, spec.kind)
        return open_backend(spec)

    def plug_virtio(self, device: Any, transport: str, devfn: int | None) -> Any:
        if transport == "mmio":
            return self.virtio.add(device)
        slot = None
        if devfn is not None:
            slot, function = devfn >> 3, devfn & 7
            if function or slot == 0:
                device.close()
                raise ConfigError(f"addr={slot:02x}.{function}: pyvmm places a device in slots 1-31, function 0")
        return self.pci.plug(device, slot)

    def count(self, driver: str) -> int:
        return self.manager.tree.count(driver)

    def _claim(self, kind: str, ident: str) -> None:
        if (kind, ident) in self._used:
            raise ConfigError(f"-{kind} {ident} is already used by another device")
        self._used.add((kind, ident))


def _drives_by_id(drives: list[DriveSpec]) -> dict[str, DriveSpec]:
    """Drives by id; an anonymous if=virtio drive is virtioN, as QEMU names it."""
    out: dict[str, DriveSpec] = {}
    n = 0
    for drive in drives:
        ident = drive.id
        if not ident:
            if drive.interface != "virtio":
                continue  # nothing can name it
            ident = f"virtio{n}"
        if drive.interface == "virtio":
            n += 1
        if ident in out:
            raise ConfigError(f"-drive id={ident}: Duplicate ID '{ident}' for drive")
        out[ident] = drive
    return out


def _netdevs_by_id(netdevs: list[NetdevSpec]) -> dict[str, NetdevSpec]:
    out: dict[str, NetdevSpec] = {}
    for spec in netdevs:
        if spec.id in out:
            raise ConfigError(f"-netdev id={spec.id}: Duplicate ID '{spec.id}' for netdev")
        out[spec.id] = spec
    return out
