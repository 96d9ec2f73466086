"""The PC's device wiring: -device, -drive and -netdev through the registry, with no accelerator."""

from __future__ import annotations

import pytest

from pyvmm.bus import Bus
from pyvmm.config import DeviceSpec, MachineConfig
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.pci.board import PciBoard
from pyvmm.devices.pvpanic import PvPanic
from pyvmm.devices.serial import Serial
from pyvmm.devices.virtio.options import parse_drive
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory
from pyvmm.net.options import parse_netdev
from support.pci_driver import GuestPci, RecordingLine, pc_devices


@pytest.fixture
def wiring(tmp_path):
    mem = GuestMemory(32 << 20)
    io, mmio = Bus("io"), Bus("mmio")
    pci = PciBoard(mem, mmio, io, RecordingLine, lambda: made[0].virtio.loop)
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 16))
    (tmp_path / "d.raw2").write_bytes(bytes(1 << 16))  # a second image: one image takes one writer
    made: list = []

    def build(*drives: str, netdevs: tuple[str, ...] = ()):
        cfg = MachineConfig(drives=[parse_drive(d.format(disk=disk)) for d in drives],
                            netdevs=[parse_netdev(n) for n in netdevs])
        made.append(pc_devices(cfg, pci, io, mmio))
        return made[-1], io, mmio

    yield build
    for d in made:
        d.virtio.close()
    pci.close()
    mem.close()


def add(devs, text: str):
    return devs.add_user_device(DeviceSpec.parse(text))


def test_isa_devices_land_on_their_ports_and_in_the_tree(wiring):
    devs, io, _ = wiring()
    serial = devs.add_serial("null")
    assert isinstance(serial.obj, Serial) and serial.path == "/machine/unattached/device[0]"
    exit_dev = add(devs, "isa-debug-exit,iobase=0x501,iosize=2,id=dx")
    panic = add(devs, "pvpanic,ioport=0x600")
    com2 = add(devs, "isa-serial,chardev=null")  # index 1: COM2
    assert isinstance(exit_dev.obj, DebugExit) and exit_dev.path == "/machine/peripheral/dx"
    assert isinstance(panic.obj, PvPanic) and panic.path == "/machine/peripheral-anon/device[0]"
    assert com2.obj.name == "serial1"
    assert io.read(0x600, 1) == 3  # pvpanic's events bitmap at its own port
    assert io.read(0x2FD, 1) & 0x60  # COM2's LSR: transmitter empty
    with pytest.raises(ConfigError, match="-device isa-debug-exit,id=dx: Duplicate ID 'dx' for device"):
        add(devs, "isa-debug-exit,id=dx")
    with pytest.raises(ConfigError, match="Max. supported number of ISA serial ports is 4"):
        add(devs, "isa-serial,index=4")
    with pytest.raises(ConfigError, match="Maximum value for \"irq\" is: 15"):
        add(devs, "isa-serial,irq=16")
    assert [d.driver for d in devs.manager.tree] == ["isa-serial", "isa-debug-exit", "pvpanic", "isa-serial"]


def test_virtio_devices_on_both_transports(wiring):
    devs, io, mmio = wiring("file={disk},format=raw,if=none,id=d0", "file={disk}2,format=raw",
                            netdevs=("tap,id=n0",))
    devs.add_drives()  # the if=virtio drive: a virtio-blk on virtio-mmio
    add(devs, "virtio-rng-pci,addr=5")
    add(devs, "virtio-blk-pci,drive=d0,id=disk0")
    add(devs, "virtio-rng-device")
    add(devs, '{"driver": "virtio-console-pci", "addr": 48}')  # JSON: a devfn, slot 6
    assert [t.device.device_id for t, _, _ in devs.virtio.transports] == [2, 4]
    found = GuestPci(io, mmio).enumerate()
    assert found[5] == (0x1AF4, 0x1044) and found[6] == (0x1AF4, 0x1043)
    assert devs.manager.tree.find("disk0").driver == "virtio-blk-pci"


@pytest.mark.parametrize(("text", "message"), [
    ("virtio-blk-pci,drive=virtio0", "already a disk of its own"),
    ("virtio-blk-pci,drive=zz", "Property 'virtio-blk-device.drive' can't find value 'zz'"),
    ("virtio-blk-pci", "drive=ID or file=PATH is required"),
    ("virtio-blk-pci,drive=d0,format=raw", "file= and format= go without it"),
    ("virtio-blk-pci,file=/nonexistent.raw,format=raw", "/nonexistent.raw"),
    ("virtio-blk-pci,file=x.img,format=vmdk", "format=vmdk is not supported"),
    ("virtio-rng-pci,speed=1", r"Property 'virtio-rng-pci\.speed' not found"),
    ("virtio-rng-pci,addr=0", "slots 1-31, function 0"),
    ("virtio-rng-pci,addr=3.1", "slots 1-31, function 0"),
    ("virtio-net-pci,netdev=n9", "Property 'netdev' can't find value 'n9'"),
    ("virtio-net-pci", "netdev= is required"),
    ("virtio-net-pci,netdev=n0,mac=01:00:00:00:00:01", "multicast"),
    ("frobnicator", "'frobnicator' is not a valid device model name"),
])
def test_device_errors_are_one_line_naming_the_option(wiring, text, message):
    devs, _, _ = wiring("file={disk},format=raw,if=none,id=d0", "file={disk}2,format=raw", netdevs=("tap,id=n0",))
    devs.add_drives()
    with pytest.raises(ConfigError, match=message) as e:
        add(devs, text)
    assert str(e.value).startswith(f"-device {text}: ") and "\n" not in str(e.value)


def test_a_backend_serves_one_device(wiring):
    devs, _, _ = wiring("file={disk},format=raw,if=none,id=d0")
    add(devs, "virtio-blk-pci,drive=d0")
    with pytest.raises(ConfigError, match="Drive 'd0' is already in use by another device"):
        add(devs, "virtio-blk-device,drive=d0")
    with pytest.raises(ConfigError, match="same PCI slot|already used by"):
        add(devs, "virtio-rng-pci,addr=5")
        add(devs, "virtio-rng-pci,addr=5")


def test_duplicate_drive_and_netdev_ids_are_refused(wiring):
    with pytest.raises(ConfigError, match="Duplicate ID 'd0' for drive"):
        wiring("file={disk},format=raw,if=none,id=d0", "file={disk},format=raw,if=none,id=d0")
    with pytest.raises(ConfigError, match="Duplicate ID .n0. for netdev"):
        wiring(netdevs=("tap,id=n0", "user,id=n0"))
