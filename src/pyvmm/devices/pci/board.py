"""PCI on the PC machine: the host bridge, ``--netdev`` back-ends and ``--device *-pci`` devices.

The machine creates one :class:`PciBoard` (always: a PC has a PCI bus, and
Linux looks for one), hands it the ``--netdev`` specs and the ``--device``
options it recognises (:data:`PCI_DRIVERS`), passes :meth:`PciBoard.acpi`
to ``build_acpi(pci=...)`` and calls :meth:`PciBoard.firmware_setup` before
each boot (BAR assignment, as a BIOS would do).

MSI-X is advertised only when the machine gives an MSI sender (KVM's
``signal_msi``); otherwise virtio-pci devices use INTx, which Linux handles
the same way minus per-queue vectors.  Device back-ends run on the virtio
iothread the caller provides (``loop()``), shared with virtio-mmio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyvmm.bus import Bus
from pyvmm.capabilities import AccelCapabilities
from pyvmm.devices.pci.host import DEFAULT_WINDOWS, LevelLine, PciHost
from pyvmm.devices.pci.msix import MsiSender
from pyvmm.devices.virtio.device import VirtioDevice
from pyvmm.devices.virtio.pci import VirtioPci
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.loop import MainLoop
from pyvmm.memory import GuestMemory
from pyvmm.net.options import NetdevSpec, format_mac, parse_nic, parse_slot
from pyvmm.x86.acpi import AcpiPciHost

log = logging.getLogger(__name__)

PCI_DRIVERS = ("virtio-net-pci", "virtio-blk-pci", "virtio-rng-pci", "virtio-console-pci")
_BOOL = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


class PciBoard:
    """Owns the PCI host and the PCI devices/back-ends of one machine."""

    def __init__(self, memory: GuestMemory, mmio_bus: Bus, io_bus: Bus, irq_line: Callable[[int], LevelLine],
                 loop: Callable[[], MainLoop], *, msi_sender: MsiSender | None = None,
                 windows: AcpiPciHost = DEFAULT_WINDOWS) -> None:
        self.memory = memory
        self.host = PciHost(memory, mmio_bus, io_bus, irq_line, windows=windows, msi_sender=msi_sender)
        self._loop = loop
        self.netdevs: dict[str, NetdevSpec] = {}
        self._used_netdevs: set[str] = set()
        self._used_drives: set[str] = set()

    # -- configuration ----------------------------------------------------------------------------------
    def add_netdev(self, spec: NetdevSpec) -> None:
        if spec.id in self.netdevs:
            raise ConfigError(f"--netdev id={spec.id} is used twice")
        self.netdevs[spec.id] = spec

    def add_device(self, driver: str, props: dict[str, str], *, drives: list | None = None,
                   make_chardev: Callable[[str], object] | None = None) -> VirtioPci:
        """``--device DRIVER,...`` for a driver in :data:`PCI_DRIVERS`."""
        if driver == "virtio-net-pci":
            nic = parse_nic(driver, props)
            dev: VirtioDevice = self._make_net(nic)
            slot = nic.slot
        else:
            slot = parse_slot(f"--device {driver}", props.get("addr"))
            dev = self._make_other(driver, {k: v for k, v in props.items() if k != "addr"}, drives or [],
                                   make_chardev)
        return self.plug(dev, slot)

    def plug(self, dev: VirtioDevice, slot: int | None = None) -> VirtioPci:
        host = self.host
        try:
            t = VirtioPci(dev, msix=host.msi_capable, msi_sender=host.send_msi if host.msi_capable else None)
            host.add(t, slot)
        except Exception:
            dev.close()
            raise
        return t

    def _make_net(self, nic) -> VirtioDevice:
        from pyvmm.devices.virtio.net import VirtioNet

        spec = self.netdevs.get(nic.netdev)
        if spec is None:
            raise ConfigError(f"--device virtio-net-pci: no --netdev with id={nic.netdev}")
        if nic.netdev in self._used_netdevs:
            raise ConfigError(f"--netdev {nic.netdev} is already used by another device")
        backend = open_backend(spec)
        self._used_netdevs.add(nic.netdev)
        n = sum(1 for d in self.host.devices.values() if isinstance(d, VirtioPci) and d.device.device_id == 1)
        name = nic.id or f"virtio-net{n}"
        log.info("%s: mac %s on %s netdev %s", name, format_mac(nic.mac), spec.kind, spec.id)
        try:
            return VirtioNet(self.memory, backend, mac=nic.mac, name=name, loop=self._loop(),
                             mrg_rxbuf=nic.mrg_rxbuf)
        except Exception:
            backend.close()
            raise

    def _make_other(self, driver: str, props: dict[str, str], drives: list,
                    make_chardev: Callable[[str], object] | None) -> VirtioDevice:
        if driver == "virtio-rng-pci":
            _only(driver, props, ("id",))
            from pyvmm.devices.virtio.rng import VirtioRng

            return VirtioRng(self.memory, loop=self._loop())
        if driver == "virtio-console-pci":
            _only(driver, props, ("id", "chardev"))
            from pyvmm.devices.virtio.console import VirtioConsole

            backend = make_chardev(props.get("chardev", "null")) if make_chardev else None
            return VirtioConsole(self.memory, backend, loop=self._loop())  # type: ignore[arg-type]
        if driver == "virtio-blk-pci":
            _only(driver, props, ("id", "drive", "file", "format", "readonly", "serial"))
            return self._make_blk(props, drives)
        raise ConfigError(f"--device {driver}: not a PCI device")

    def _make_blk(self, props: dict[str, str], drives: list) -> VirtioDevice:
        from pyvmm.block import open_image
        from pyvmm.devices.virtio.blk import VirtioBlk

        if "drive" in props:
            drive = next((d for d in drives if getattr(d, "id", "") == props["drive"]), None)
            if drive is None:
                raise ConfigError(f"--device virtio-blk-pci: no --drive with id={props['drive']}")
            if getattr(drive, "interface", "none") != "none":
                raise ConfigError(f"--device virtio-blk-pci: --drive id={drive.id} needs if=none "
                                  "(otherwise it is already a virtio-mmio disk)")
            if drive.id in self._used_drives:
                raise ConfigError(f"--drive id={drive.id} is already used by another device")
            self._used_drives.add(drive.id)
            path, fmt, ro, serial = drive.file, drive.format, drive.readonly, drive.serial
        elif "file" in props:
            ro_text = props.get("readonly", "off").lower()
            if ro_text not in _BOOL:
                raise ConfigError(f"--device virtio-blk-pci: readonly={ro_text} is not on/off")
            path, fmt, ro, serial = props["file"], props.get("format"), _BOOL[ro_text], props.get("serial", "")
            if fmt not in (None, "raw", "qcow2"):
                raise ConfigError(f"--device virtio-blk-pci: format={fmt} is not supported (raw or qcow2)")
        else:
            raise ConfigError("--device virtio-blk-pci: drive=ID or file=PATH is required")
        try:
            image = open_image(path, fmt, read_only=ro)
        except PyvmmError as e:
            raise ConfigError(f"--device virtio-blk-pci: {path}: {e}") from None
        return VirtioBlk(self.memory, image, serial=serial, read_only=ro, name=props.get("id") or "virtio-blk-pci",
                         loop=self._loop())

    def check_unused(self) -> None:
        for ident in sorted(set(self.netdevs) - self._used_netdevs):
            log.warning("--netdev %s is not used by any device", ident)

    # -- machine hooks -----------------------------------------------------------------------------------
    def acpi(self) -> AcpiPciHost:
        return self.host.windows

    def firmware_setup(self) -> None:
        """Assign BARs and enable decoding (before each boot; reset clears them)."""
        self.host.assign_resources()

    def attach_capabilities(self, caps: AccelCapabilities) -> None:
        """Use the accelerator's fast paths (once, after the devices are added).

        Notify writes of virtio-pci devices go to ioeventfds where the accelerator has them;
        where it needs to hear of DMA (tcg), every virtio device tells it what it wrote.
        """
        for dev in self.host.devices.values():
            if not isinstance(dev, VirtioPci):
                continue
            if caps.dma_written is not None:
                dev.device.set_dma_hook(caps.dma_written)
            if caps.ioeventfd is not None:
                dev.attach_ioeventfds(caps.ioeventfd, self._loop())

    def reset(self) -> None:
        self.host.reset()

    def close(self) -> None:
        self.host.close()


def open_backend(spec: NetdevSpec):
    """Create the host side of a ``--netdev``."""
    if spec.kind == "tap":
        from pyvmm.net.tap import TapBackend

        return TapBackend(spec.ifname)
    from pyvmm.net.user import PasstBackend

    return PasstBackend(spec.passt)


def _only(driver: str, props: dict[str, str], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(props) - set(allowed))
    if extra:
        raise ConfigError(f"--device {driver}: unknown property {extra[0]!r} (known: {', '.join(allowed)})")
