"""``--drive`` parsing and the CLI's one-line errors for virtio options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvmm.devices.virtio.options import DriveSpec, parse_drive
from pyvmm.errors import ConfigError


def test_parse_drive_full():
    d = parse_drive("file=/tmp/a,,b.img,format=qcow2,readonly=on,if=virtio,serial=SN1,id=disk0")
    assert d == DriveSpec(file="/tmp/a,b.img", format="qcow2", readonly=True, interface="virtio",
                          serial="SN1", id="disk0")


def test_parse_drive_defaults():
    d = parse_drive("file=x.raw")
    assert d.format is None and not d.readonly and d.interface == "virtio"


@pytest.mark.parametrize("spec,msg", [
    ("format=raw", "file= is required"),
    ("file=a,format=vmdk", "format=vmdk is not supported"),
    ("file=a,readonly=maybe", "readonly=maybe"),
    ("file=a,if=ide", "if=ide is not supported"),
    ("file=a,if=none", "if=none needs id="),
    ("file=a,bogus=1", "unknown property 'bogus'"),
    ("file=a,file=b", "given twice"),
    ("file=a,noequals", "is not key=value"),
    ("file=a,serial=" + "x" * 21, "at most 20"),
    ("file=a,media=cdrom", "media=cdrom"),
])
def test_parse_drive_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg) as ei:
        parse_drive(spec)
    assert "\n" not in str(ei.value)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pyvmm", "run", "--accel", "tcg", "--kernel", "/bin/true", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.parametrize("args,msg", [
    (("--drive", "file=/nonexistent.img,format=raw"), "no such file"),
    (("--drive", "format=raw"), "file= is required"),
    (("--device", "virtio-rng,foo=1"), "Property 'virtio-rng-device.foo' not found"),
    (("--device", "virtio-rng",) * 9, "too many virtio-mmio devices"),
])
def test_cli_errors_are_one_line(args, msg):
    r = _run(*args)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("pyvmm: error")]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_if_none_drive_is_left_alone(tmp_path):
    from pyvmm.bus import Bus
    from pyvmm.config import MachineConfig
    from pyvmm.devices.pci.board import PciBoard
    from pyvmm.memory import GuestMemory
    from support.pci_driver import RecordingLine, pc_devices

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    spec = parse_drive(f"file={img},format=raw,if=none,id=d0")
    assert spec.interface == "none" and spec.id == "d0"
    mem = GuestMemory(4 << 20)
    io, mmio = Bus("io"), Bus("mmio")
    pci = PciBoard(mem, mmio, io, RecordingLine, lambda: devs.virtio.loop)
    devs = pc_devices(MachineConfig(drives=[spec]), pci, io, mmio)
    try:
        devs.add_drives()
        assert devs.virtio.transports == [] and len(devs.manager.tree) == 0
    finally:
        devs.virtio.close()
        pci.close()
        mem.close()
