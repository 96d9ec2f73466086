"""The SDK's pieces that need no guest: pyvmm exec's arguments, sizes, the exit-status device, VM checks."""

from __future__ import annotations

import pytest

from pyvmm.devices.exit_status import ExitStatus
from pyvmm.errors import PyvmmError
from pyvmm.runstate import RequestKind, VmControl
from pyvmm.sdk.exec_cli import parse_exec_args
from pyvmm.sdk.vm import VM, Disk, VMError, memory_bytes


def test_exec_arguments_split_at_the_double_dash() -> None:
    kw, extra, cmd = parse_exec_args(["-m", "1G", "--smp=2", "-accel", "tcg", "--timeout", "5",
                                      "-device", "virtio-rng-pci", "--", "sh", "-c", "exit 3", "--", "x"])
    assert kw == {"memory": "1G", "cpus": 2, "accel": "tcg", "timeout": 5.0}
    assert extra == ["-device", "virtio-rng-pci"] and cmd == ["sh", "-c", "exit 3", "--", "x"]
    for bad in (["sh"], ["--"], ["-m"], ["--timeout", "soon", "--", "true"]):
        with pytest.raises(PyvmmError):
            parse_exec_args(bad)


def test_memory_sizes() -> None:
    assert memory_bytes("512M") == 512 << 20 and memory_bytes("2G") == 2 << 30 and memory_bytes("256") == 256 << 20
    with pytest.raises(VMError):
        memory_bytes("lots")


def test_exit_status_device_posts_the_status_itself() -> None:
    control = VmControl()
    ExitStatus(control).io_write(0, 1, 3)
    req = control.wait(0.1)
    assert req is not None and req.kind == RequestKind.EXIT and req.status == 3


def test_vm_checks_its_arguments() -> None:
    with pytest.raises(VMError):
        VM(cpus=0)
    with pytest.raises(VMError):
        VM(vmm="bochs")
    with pytest.raises(VMError):
        VM(vmm="qemu", plugins=["x.py"])
    assert Disk("/a,b.img", format="qcow2", readonly=True).args() == [
        "-drive", "file=/a,,b.img,if=virtio,format=qcow2,readonly=on"]
    with pytest.raises(VMError):
        VM().exec(["true"])  # not started
