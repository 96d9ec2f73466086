"""The test guests themselves, validated on QEMU (TCG).

If a guest misbehaves under QEMU, a pyvmm test failure on that guest means
nothing; these tests pin down the guests' expected results on the reference
VMM.  Differences in expectations are explicit (QEMU's loader type is 0xb0).
"""

from __future__ import annotations

import pytest

from conftest import INITRD_SIZE, debug_exit_status, guest_checksum, initrd_bytes, run_qemu

MB_ALL = 0x7F


def test_qemu_realmode_hello(guests):
    r = run_qemu("-drive", f"format=raw,file={guests['realmode_hello']}", "-no-reboot")
    assert r.returncode == debug_exit_status(0x2A), r.describe()
    assert "Hello from real mode\n" in r.serial


@pytest.mark.parametrize("mem", [128, 4096])
@pytest.mark.parametrize("name", ["multiboot_info", "multiboot_aout"])
def test_qemu_multiboot(guests, initrd_file, name, mem):
    r = run_qemu("-m", f"{mem}M", "-smp", "2", "-no-reboot", "-kernel", guests[name], "-initrd", initrd_file,
                 "-append", f"pyvmm-test mem={mem} cpus=2 initrd={INITRD_SIZE}")
    assert r.returncode == debug_exit_status(MB_ALL), r.describe()
    assert f"mod_sum={guest_checksum(initrd_bytes()):#x}" in r.serial


@pytest.mark.parametrize("mem", [128, 5000])
def test_qemu_linux64(guests, initrd_file, mem):
    r = run_qemu("-m", f"{mem}M", "-no-reboot", "-kernel", guests["linux64"], "-initrd", initrd_file,
                 "-append", f"pyvmm-test mem={mem} initrd={INITRD_SIZE}")
    # Everything but CHECK_LOADER: QEMU identifies itself as loader type 0xb0, pyvmm as 0xff.
    assert r.returncode == debug_exit_status(0x7D), r.describe()
    assert "type_of_loader=0xb0" in r.serial


@pytest.mark.parametrize("mem", [128, 4096])
def test_qemu_pvh(guests, initrd_file, mem):
    r = run_qemu("-m", f"{mem}M", "-no-reboot", "-kernel", guests["pvh"], "-initrd", initrd_file,
                 "-append", f"pyvmm-test mem={mem} initrd={INITRD_SIZE}")
    assert r.returncode == debug_exit_status(0x7F), r.describe()


@pytest.mark.parametrize("reboot", [0, 1])
@pytest.mark.parametrize("ncpus", [1, 2, 4])
def test_qemu_smp(guests, ncpus, reboot):
    # sockets=N: SeaBIOS lists only the first CPU of each package in its MP table.
    r = run_qemu("-smp", f"{ncpus},sockets={ncpus}", "-kernel", guests["smp"], "-append", f"reboot={reboot}")
    expected = (1 << ncpus) - 1 | 0x10 | (0x20 if reboot else 0)
    assert r.returncode == debug_exit_status(expected), r.describe()


@pytest.mark.parametrize("ncpus", [1, 2, 4])
def test_qemu_smp_ipi(guests, ncpus):
    r = run_qemu("-smp", f"{ncpus},sockets={ncpus}", "-no-reboot", "-kernel", guests["smp"], "-append", "ipi=1")
    assert r.returncode == debug_exit_status(0x50 | (1 << ncpus) - 1), r.describe()


def test_qemu_smp_ap_triple_fault(guests):
    r = run_qemu("-smp", "2,sockets=2", "-kernel", guests["smp"], "-append", "reboot=1 apfault=1")
    assert r.returncode == debug_exit_status(0x33), r.describe()


def test_qemu_smp_stress(guests):
    r = run_qemu("-smp", "2,sockets=2", "-no-reboot", "-kernel", guests["smp"], "-append", "stress=300")
    assert r.returncode == debug_exit_status(0x53), r.describe()


@pytest.mark.parametrize("apic", [0, 1])
def test_qemu_irq(guests, apic):
    # The input must arrive after SeaBIOS is done, so wait for the guest's prompt first.
    r = run_qemu("-no-reboot", "-kernel", guests["irq"], "-append", f"apic={apic}",
                 send_after=(b"send input", b"ping."))
    assert r.returncode == debug_exit_status(0x1F), r.describe()
    assert 'rx="ping"' in r.serial


def test_qemu_acpi_poweroff(guests):
    r = run_qemu("-smp", "2,sockets=2", "-kernel", guests["acpi"])
    assert r.returncode == 0, r.describe()
    assert "acpi_checks=0x3f" in r.serial and "still running" not in r.serial, r.describe()


@pytest.mark.parametrize("name", ["uart_regs", "fwcfg"])
def test_qemu_device_probes(guests, name):
    r = run_qemu("-no-reboot", "-kernel", guests[name])
    assert r.returncode == debug_exit_status(0x7F), r.describe()


def test_qemu_triple_fault(guests):
    disk = f"format=raw,file={guests['triple_fault']},snapshot=on"
    r = run_qemu("-drive", disk)
    assert r.returncode == debug_exit_status(0x13), r.describe()
    out = r.serial
    assert "boot 1\ntriple fault now\n" in out, r.describe()
    assert out.index("boot 1") < out.index("boot 2\n") < out.index("boot 3\n"), r.describe()
    r = run_qemu("-drive", disk, "-no-reboot")
    assert r.returncode == 0, r.describe()
    assert "boot 1\n" in r.serial and "boot 2" not in r.serial


def test_qemu_oob(guests):
    r = run_qemu("-m", "128M", "-no-reboot", "-kernel", guests["oob"], "-append", "pyvmm-test mem=128")
    assert r.returncode == debug_exit_status(0x7F), r.describe()
    assert "dma survived" in r.serial
