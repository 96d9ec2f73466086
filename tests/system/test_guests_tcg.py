"""The same purpose-built guests on pyvmm's tcg accelerator (single vCPU; SMP: test_tcg_smp.py).

Both accelerators must give every guest the same verdict, so these use the
expectations of test_guests_kvm.py.  No /dev/kvm needed.
"""

from __future__ import annotations

import pytest

from conftest import INITRD_SIZE, debug_exit_status, run_pyvmm

ALL = 0x7F


def run_tcg(*args, **kw):
    return run_pyvmm("--accel", "tcg", "--device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *args, **kw)


def test_tcg_realmode_hello(guests):
    r = run_tcg("--kernel", guests["realmode_hello"])
    assert r.returncode == debug_exit_status(0x2A), r.describe()
    assert r.serial == "Hello from real mode\n", r.describe()


@pytest.mark.parametrize("name", ["multiboot_info", "multiboot_aout"])
def test_tcg_multiboot(guests, initrd_file, name):
    r = run_tcg("-m", "128M", "--kernel", guests[name], "--initrd", initrd_file,
                "--append", f"pyvmm-test mem=128 cpus=1 initrd={INITRD_SIZE}")
    assert r.returncode == debug_exit_status(ALL), r.describe()


@pytest.mark.parametrize("name", ["linux64", "linux32"])
def test_tcg_linux(guests, initrd_file, name):
    r = run_tcg("-m", "128M", "--kernel", guests[name], "--initrd", initrd_file,
                "--append", f"pyvmm-test mem=128 initrd={INITRD_SIZE}")
    assert r.returncode == debug_exit_status(ALL), r.describe()


def test_tcg_pvh(guests, initrd_file):
    r = run_tcg("-m", "128M", "--kernel", guests["pvh"], "--initrd", initrd_file,
                "--append", f"pyvmm-test mem=128 initrd={INITRD_SIZE}")
    assert r.returncode == debug_exit_status(ALL), r.describe()


def test_tcg_smp_single_cpu(guests):
    r = run_tcg("--kernel", guests["smp"])
    assert r.returncode == debug_exit_status(0x11), r.describe()


def test_tcg_lapic_timer_wakes_hlt(guests):
    r = run_tcg("--kernel", guests["smp"], "--append", "ipi=1")
    assert r.returncode == debug_exit_status(0x51), r.describe()


def test_tcg_serial_echo(guests):
    r = run_tcg("--kernel", guests["serial_echo"], input=b"hello World.")
    assert r.returncode == debug_exit_status(11), r.describe()
    assert r.serial == "echo ready\nHELLO WORLD\nbye\n", r.describe()


def test_tcg_resets(guests):
    r = run_tcg("--kernel", guests["triple_fault"])
    assert r.returncode == debug_exit_status(0x13), r.describe()
    r = run_tcg("--no-reboot", "--kernel", guests["triple_fault"])
    assert r.returncode == 0, r.describe()
    assert "boot 2" not in r.serial


@pytest.mark.parametrize("apic", [0, 1])
def test_tcg_irq(guests, apic):
    r = run_tcg("--kernel", guests["irq"], "--append", f"apic={apic}", input=b"ping.")
    assert r.returncode == debug_exit_status(0x1F), r.describe()


def test_tcg_uart_registers(guests):
    r = run_tcg("--kernel", guests["uart_regs"])
    assert r.returncode == debug_exit_status(ALL), r.describe()


def test_tcg_out_of_ram(guests):
    r = run_tcg("-m", "128M", "--kernel", guests["oob"], "--append", "pyvmm-test mem=128")
    assert r.returncode == debug_exit_status(ALL), r.describe()


def test_tcg_io_sweep(guests):
    r = run_tcg("-m", "128M", "--kernel", guests["ioscan"], "--append", "mem=128")
    assert r.returncode == debug_exit_status(0x0F), r.describe()
