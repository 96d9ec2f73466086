"""End-to-end tests: purpose-built guests booted by ``pyvmm run`` on the real /dev/kvm.

Each guest checks one part of the machine from the inside and reports through
the UART and an isa-debug-exit value whose bits say which checks passed, so
a failure names the broken feature (see tests/support/guests/*.c for the bit
meanings).  The guests are validated on QEMU in test_guests_qemu.py.  Serial
back-ends are in test_guests_kvm_serial.py, bad input in test_guests_kvm_errors.py.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    ALL_CHECKS,
    INITRD_SIZE,
    debug_exit_status,
    guest_checksum,
    initrd_bytes,
    reported,
    run_pyvmm,
    run_pyvmm_kvm,
    run_qemu,
)

pytestmark = pytest.mark.usefixtures("kvm")


def mb_cmdline(mem: int, cpus: int, initrd: int = INITRD_SIZE) -> str:
    return f"pyvmm-test mem={mem} cpus={cpus} initrd={initrd}"


# -- real mode ---------------------------------------------------------------------------------

def test_realmode_hello(guests):
    r = run_pyvmm_kvm("--kernel", guests["realmode_hello"])
    assert r.returncode == debug_exit_status(0x2A), r.describe()
    assert r.serial == "Hello from real mode\n", r.describe()


def test_realmode_hello_default_debug_exit_device(guests):
    """``-device isa-debug-exit`` without properties sits at 0xf4 like QEMU's."""
    r = run_pyvmm("--accel", "kvm", "-device", "isa-debug-exit", "-kernel", guests["realmode_hello"])
    assert r.returncode == debug_exit_status(0x2A), r.describe()


def test_large_boot_image_runs_past_first_sector(guests):
    """pyvmm extension: a 32 KiB boot image is loaded whole at 0x7c00; DL holds the boot drive."""
    r = run_pyvmm_kvm("--kernel", guests["bigboot"])
    assert r.returncode == debug_exit_status(0x2B), r.describe()
    assert r.serial.startswith("dl=0x80\n"), r.describe()


# -- multiboot ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["multiboot_info", "multiboot_aout"])
@pytest.mark.parametrize("mem,cpus", [(128, 1), (256, 2)])
def test_multiboot_info(guests, initrd_file, name, mem, cpus):
    cmdline = mb_cmdline(mem, cpus)
    r = run_pyvmm_kvm("--memory", f"{mem}M", "--smp", str(cpus), "--kernel", guests[name],
                      "--initrd", initrd_file, "--append", cmdline)
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    out = r.serial
    assert reported(out, "magic") == "0x2badb002"
    assert reported(out, "cmdline").strip('"').endswith(cmdline), r.describe()
    assert reported(out, "mod_size") == str(INITRD_SIZE)
    assert reported(out, "mod_sum") == f"{guest_checksum(initrd_bytes()):#x}"
    assert int(reported(out, "fw_cfg_ram"), 16) == mem << 20
    assert reported(out, "fw_cfg_cpus") == str(cpus)
    assert reported(out, "result") == f"{ALL_CHECKS:#x}"


def test_multiboot_qemu_spellings(guests, initrd_file):
    """QEMU's single-dash options, as a QEMU user would type them."""
    cmdline = mb_cmdline(128, 2)
    r = run_pyvmm("-accel", "kvm", "-nographic", "-no-reboot", "-m", "128M", "-smp", "2",
                  "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                  "-kernel", guests["multiboot_info"], "-initrd", initrd_file, "-append", cmdline)
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()


def test_multiboot_one_gib(guests, initrd_file):
    r = run_pyvmm_kvm("-m", "1G", "--kernel", guests["multiboot_info"], "--initrd", initrd_file,
                      "--append", mb_cmdline(1024, 1))
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()


@pytest.mark.parametrize("mem", [3072, 4096, 5000, 8192])
def test_ram_split_around_the_pci_hole(guests, initrd_file, mem):
    """RAM above 3 GiB continues at 4 GiB: in the multiboot mmap and the Linux e820 table, and the
    64-bit guests write and read back both ends of it (no aliasing onto low RAM)."""
    for kernel in ("multiboot_info", "linux64", "linux32"):
        r = run_pyvmm_kvm("-m", f"{mem}M", "--kernel", guests[kernel], "--initrd", initrd_file,
                          "--append", f"pyvmm-test mem={mem} cpus=1 initrd={INITRD_SIZE}")
        assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
        if kernel != "multiboot_info" and mem > 3072:
            assert reported(r.serial, "high_ram_ok") == "1", r.describe()


def test_multiboot_without_module(guests):
    """No --initrd: every check but the module one passes (mods_count 0)."""
    r = run_pyvmm_kvm("-m", "128M", "--kernel", guests["multiboot_info"], "--append", mb_cmdline(128, 1))
    assert r.returncode == debug_exit_status(ALL_CHECKS & ~0x08), r.describe()


def test_multiboot_two_modules_with_arguments(guests, initrd_file):
    """QEMU's -initrd syntax for multiboot: comma-separated modules, each 'path args'."""
    r = run_pyvmm_kvm("-m", "128M", "--kernel", guests["multiboot_info"],
                      "--initrd", f"{initrd_file} arg1=x,{initrd_file}",
                      "--append", mb_cmdline(128, 1) + " mods=2")
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    assert reported(r.serial, "mod_cmdline") == f'"{initrd_file} arg1=x"'
    assert reported(r.serial, "mod1_cmdline") == f'"{initrd_file}"'


def test_rtc_time_is_host_utc(guests):
    r = run_pyvmm_kvm("--kernel", guests["multiboot_info"], "--append", mb_cmdline(512, 1))
    guest_time = datetime.datetime.strptime(reported(r.serial, "rtc"), "%Y-%m-%d %H:%M:%S")
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs((now - guest_time).total_seconds()) < 120, r.describe()


@pytest.mark.parametrize("mem,cpus", [(128, 1), (1024, 2), (4096, 1)])
def test_cmos_memory_and_cpu_bytes_match_qemu(guests, mem, cpus):
    """The CMOS bytes firmware reads for memory size and CPU count, compared with QEMU's."""
    args = ["-m", f"{mem}M", "-smp", str(cpus), "-kernel", guests["multiboot_info"],
            "-append", mb_cmdline(mem, cpus)]
    q = run_qemu("-no-reboot", *args)
    p = run_pyvmm_kvm("-no-reboot", *args)
    for key in ("cmos_ext_mem_kb", "cmos_mem_above_16m_64k", "cmos_mem_above_4g_64k", "cmos_cpus_minus_1"):
        assert reported(p.serial, key) == reported(q.serial, key), f"{key}\n{p.describe()}"


def test_multiboot_matches_qemu(guests, initrd_file):
    """Cross-check: pyvmm and QEMU (TCG) give the guest the same verdict."""
    args = ["-m", "128M", "-smp", "2", "-kernel", guests["multiboot_info"], "-initrd", initrd_file,
            "-append", mb_cmdline(128, 2)]
    q = run_qemu("-no-reboot", *args)
    p = run_pyvmm_kvm("-no-reboot", *args)
    assert q.returncode == debug_exit_status(ALL_CHECKS), q.describe()
    assert p.returncode == q.returncode, p.describe()


# -- Linux boot protocol, 64-bit entry ---------------------------------------------------------

def test_linux64_bzimage(guests, initrd_file):
    cmdline = f"pyvmm-test mem=128 initrd={INITRD_SIZE}"
    r = run_pyvmm_kvm("-m", "128M", "--kernel", guests["linux64"], "--initrd", initrd_file,
                      "--append", cmdline)
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    out = r.serial
    assert reported(out, "cmdline") == f'"{cmdline}"'
    assert reported(out, "type_of_loader") == "0xff"
    assert reported(out, "entry") == "64"
    assert reported(out, "ramdisk_size") == str(INITRD_SIZE)
    assert reported(out, "ramdisk_sum") == f"{guest_checksum(initrd_bytes()):#x}"


def test_linux_bzimage_without_xlf_kernel_64_uses_32bit_entry(guests, initrd_file):
    r = run_pyvmm_kvm("-m", "128M", "--kernel", guests["linux32"], "--initrd", initrd_file,
                      "--append", f"pyvmm-test mem=128 initrd={INITRD_SIZE}")
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    assert reported(r.serial, "entry") == "32"


def test_linux64_bzimage_no_initrd(guests):
    r = run_pyvmm_kvm("-m", "256M", "--kernel", guests["linux64"], "--append", "pyvmm-test mem=256")
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    assert reported(r.serial, "ramdisk_size") == "0"


def test_linux64_longest_cmdline_is_passed_intact(guests):
    """cmdline_size in the header is 2047: a 2047-byte command line must arrive whole."""
    cmdline = "pyvmm-test mem=128 "
    cmdline += "y" * (2047 - len(cmdline))
    r = run_pyvmm_kvm("-m", "128M", "--kernel", guests["linux64"], "--append", cmdline)
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    assert reported(r.serial, "cmdline") == f'"{cmdline}"'


# -- PVH -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mem", [128, 4096])
def test_pvh_start_info(guests, initrd_file, mem):
    """ELF with XEN_ELFNOTE_PHYS32_ENTRY: hvm_start_info (cmdline, module, memmap, RSDP)."""
    cmdline = f"pyvmm-test mem={mem} initrd={INITRD_SIZE}"
    r = run_pyvmm_kvm("-m", f"{mem}M", "--kernel", guests["pvh"], "--initrd", initrd_file, "--append", cmdline)
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    assert reported(r.serial, "cmdline") == f'"{cmdline}"'
    assert reported(r.serial, "mod_sum") == f"{guest_checksum(initrd_bytes()):#x}"


# -- SMP ---------------------------------------------------------------------------------------

SMP_MPTABLE_OK = 0x10
SMP_REBOOTED = 0x20


@pytest.mark.parametrize("ncpus", [1, 2, 4])
def test_smp_aps_start(guests, ncpus):
    r = run_pyvmm_kvm("--smp", str(ncpus), "--kernel", guests["smp"], timeout=90)
    mask = (1 << ncpus) - 1
    assert r.returncode == debug_exit_status(SMP_MPTABLE_OK | mask), r.describe()
    out = r.serial
    assert "BSP apic_id=0 up" in out
    for apic_id in range(1, ncpus):
        assert f"AP apic_id={apic_id} up" in out, r.describe()
    assert reported(out, "mp_processors") == str(ncpus)


@pytest.mark.parametrize("ncpus", [1, 2, 4])
def test_smp_aps_restart_after_triple_fault(guests, ncpus):
    """Reset with APs running: the second boot must be able to INIT/SIPI them again."""
    r = run_pyvmm_kvm("--smp", str(ncpus), "--kernel", guests["smp"], "--append", "reboot=1", timeout=90)
    mask = (1 << ncpus) - 1
    assert r.returncode == debug_exit_status(SMP_REBOOTED | SMP_MPTABLE_OK | mask), r.describe()
    assert "boot=1\n" in r.serial and "boot=2\n" in r.serial


SMP_MODE_OK = 0x40


@pytest.mark.parametrize("ncpus", [1, 2, 4])
def test_smp_ipis_wake_halted_cpus_and_lapic_timer(guests, ncpus):
    """Fixed IPIs AP->BSP and BSP->AP, each wakes a CPU halted with interrupts on; LAPIC timer ticks."""
    r = run_pyvmm_kvm("--smp", str(ncpus), "--kernel", guests["smp"], "--append", "ipi=1", timeout=90)
    mask = (1 << ncpus) - 1
    assert r.returncode == debug_exit_status(SMP_MODE_OK | SMP_MPTABLE_OK | mask), r.describe()
    aps = mask & ~1
    assert int(reported(r.serial, "ipi_at_bsp"), 16) == aps
    assert int(reported(r.serial, "ipi_at_ap"), 16) == aps


def test_reset_rebuilds_firmware_tables_the_guest_wiped(guests):
    """MP and ACPI tables sit in (reserved) RAM; a guest may scribble on them, a reset restores them."""
    r = run_pyvmm_kvm("--smp", "2", "--kernel", guests["smp"], "--append", "reboot=1 wipe=1", timeout=90)
    assert r.returncode == debug_exit_status(SMP_REBOOTED | SMP_MPTABLE_OK | 0x3), r.describe()
    r = run_pyvmm_kvm("--kernel", guests["acpi"], "--append", "reset=1 wipe=1")
    assert r.returncode == debug_exit_status(0x7F), r.describe()


@pytest.mark.parametrize("ncpus", [2, 4])
def test_smp_triple_fault_on_an_ap_resets_the_machine(guests, ncpus):
    r = run_pyvmm_kvm("--smp", str(ncpus), "--kernel", guests["smp"], "--append", "reboot=1 apfault=1",
                      timeout=90)
    mask = (1 << ncpus) - 1
    assert r.returncode == debug_exit_status(SMP_REBOOTED | SMP_MPTABLE_OK | mask), r.describe()
    assert "AP 1 triple faults now" in r.serial and "boot=2\n" in r.serial


def test_smp_triple_fault_on_an_ap_with_no_reboot_exits(guests):
    r = run_pyvmm_kvm("--no-reboot", "--smp", "2", "--kernel", guests["smp"], "--append", "reboot=1 apfault=1",
                      timeout=90)
    assert r.returncode == 0, r.describe()
    assert "boot=2" not in r.serial


@pytest.mark.parametrize("ncpus", [2, 4])
def test_smp_concurrent_device_access(guests, ncpus):
    """All vCPUs hit fw_cfg (DMA + ports), CMOS, port 0x80, UART and LAPIC at once."""
    r = run_pyvmm_kvm("--smp", str(ncpus), "--kernel", guests["smp"], "--append", "stress=800", timeout=90)
    mask = (1 << ncpus) - 1
    assert r.returncode == debug_exit_status(SMP_MODE_OK | SMP_MPTABLE_OK | mask), r.describe()
    assert reported(r.serial, "stress_bad") == "0"


# -- serial input ------------------------------------------------------------------------------


def test_fw_cfg_interface_corners(guests):
    r = run_pyvmm_kvm("--kernel", guests["fwcfg"])
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()


def test_debug_exit_iobase_property(guests):
    r = run_pyvmm("--accel", "kvm", "--device", "isa-debug-exit,iobase=0x501,iosize=0x02",
                  "--kernel", guests["multiboot_info"], "--append", "pyvmm-test mem=512 exitport=0x501")
    assert r.returncode == debug_exit_status(ALL_CHECKS & ~0x08), r.describe()


def test_pyvmm_console_script(guests):
    """The installed ``pyvmm`` entry point, not only ``python -m pyvmm``: the one next to this
    interpreter, so the test checks the virtualenv it runs in whatever PATH holds."""
    exe = Path(sys.executable).parent / "pyvmm"
    assert exe.is_file() and os.access(exe, os.X_OK), f"no pyvmm console script in {exe.parent} (pip install -e .)"
    proc = subprocess.run([str(exe), "run", "--accel", "kvm", "--device", "isa-debug-exit",
                           "--kernel", str(guests["realmode_hello"])],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert proc.returncode == debug_exit_status(0x2A), proc.stderr.decode(errors="replace")
    assert proc.stdout == b"Hello from real mode\n"


def _cpuid_leaves(serial: str) -> dict[str, list[int]]:
    return {m.group(1): [int(x, 16) for x in m.group(2).split()]
            for m in re.finditer(r"^cpuid_([0-9a-f.]+)=(.*)$", serial, re.M)}


def test_cpuid_hypervisor_leaves(guests):
    r = run_pyvmm_kvm("--kernel", guests["cpuid"])
    assert r.returncode == debug_exit_status(1), r.describe()
    leaves = _cpuid_leaves(r.serial)
    assert leaves["1"][2] & (1 << 31), "CPUID.1:ECX.hypervisor not set"
    assert leaves["1"][1] >> 24 == 0, "BSP APIC id in CPUID.1:EBX[31:24] is not 0"
    sig = b"".join(v.to_bytes(4, "little") for v in leaves["40000000"][1:4])
    assert sig == b"KVMKVMKVM\0\0\0", sig


def test_cpu_feature_edits_reach_the_guest(guests):
    """-x2apic and -nx clear exactly those bits (both are always offered by KVM)."""
    base = run_pyvmm_kvm("--cpu", "host", "--kernel", guests["cpuid"])
    edit = run_pyvmm_kvm("--cpu", "host,-x2apic,-nx", "--kernel", guests["cpuid"])
    assert base.returncode == edit.returncode == debug_exit_status(1), edit.describe()
    b, e = _cpuid_leaves(base.serial), _cpuid_leaves(edit.serial)
    assert b["1"][2] & (1 << 21) and b["80000001"][3] & (1 << 20), base.describe()
    assert e["1"][2] == b["1"][2] & ~(1 << 21), edit.describe()
    assert e["80000001"][3] == b["80000001"][3] & ~(1 << 20), edit.describe()
    for leaf in ("0", "7", "80000000", "40000000"):
        assert e[leaf] == b[leaf], leaf


@pytest.mark.parametrize(("smp", "smt_shift", "threads", "pkg_shift", "per_pkg"), [
    ("4", 0, 1, 2, 4),                               # -smp N: N cores in one package
    ("4,sockets=2,cores=2,threads=1", 0, 1, 1, 2),
    ("8,sockets=1,cores=2,threads=4", 2, 4, 3, 8),
    ("6,sockets=2,cores=3", 0, 1, 2, 3),             # 3 cores take 2 bits
])
def test_smp_topology_reaches_cpuid(guests, smp, smt_shift, threads, pkg_shift, per_pkg):
    """The boot CPU's leaf 0xB (SMT, then core level: shift to the next level, logical
    processors), leaf 1's per-package count and HTT, and leaf 4's core ids follow -smp."""
    r = run_pyvmm_kvm("--smp", smp, "--kernel", guests["cpuid"])
    assert r.returncode == debug_exit_status(1), r.describe()
    leaves = _cpuid_leaves(r.serial)
    assert leaves["b.0"] == [smt_shift, threads, 0x100, 0], r.describe()
    assert leaves["b.1"] == [pkg_shift, per_pkg, 0x201, 0], r.describe()
    assert leaves["b.2"][:3] == [0, 0, 2], r.describe()
    assert (leaves["1"][1] >> 16) & 0xFF == per_pkg and leaves["1"][3] & (1 << 28), r.describe()
    if leaves["4.0"][0] & 0x1F:  # an Intel-style cache leaf (AMD hosts answer leaf 4 with zeros)
        assert leaves["4.0"][0] >> 26 == (1 << (pkg_shift - smt_shift)) - 1, r.describe()


def test_smp_sparse_apic_ids_start_and_are_listed(guests):
    """2 packages of 3 cores: package 1 starts at APIC id 4; with maxcpus=6, 4 CPUs are present.
    The APs start (INIT/SIPI to all) with those ids, and the MP table lists exactly them."""
    r = run_pyvmm_kvm("--smp", "4,sockets=2,cores=3,maxcpus=6", "--kernel", guests["smp"], timeout=90)
    out = r.serial
    for apic_id in (1, 2, 4):
        assert f"AP apic_id={apic_id} up" in out, r.describe()
    assert "apic_id=3 " not in out, r.describe()
    assert reported(out, "mp_apic_ids") == "0x17", r.describe()
    assert reported(out, "cpus_up") == "0x17", r.describe()


# -- interrupts --------------------------------------------------------------------------------

IRQ_ALL = 0x1F


@pytest.mark.parametrize("mode", ["pic", "ioapic"])
def test_irq_pit_and_uart_interrupts(guests, mode):
    """PIT ticks, UART THRE/RX interrupts and interrupt-driven transmit (PIC, or I/O APIC as the
    MP table says)."""
    apic = 1 if mode == "ioapic" else 0
    r = run_pyvmm_kvm("--kernel", guests["irq"], "--append", f"apic={apic}", input=b"ping.", timeout=60)
    out = r.serial
    assert r.returncode == debug_exit_status(IRQ_ALL), r.describe()
    assert int(reported(out, "ticks")) >= 10
    assert reported(out, "rx") == '"ping"'
    assert reported(out, "unexpected") == "0"
    assert "\ninterrupt-driven transmit: the quick brown fox" in out, r.describe()
    assert "written from the THRE interrupt handler.\n" in out, r.describe()


# -- resets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ncpus", [1, 2])
def test_triple_fault_and_kbd_reset_reboot(guests, ncpus):
    r = run_pyvmm_kvm("--smp", str(ncpus), "--kernel", guests["triple_fault"])
    assert r.returncode == debug_exit_status(0x13), r.describe()
    out = r.serial
    assert "boot 1\ntriple fault now\n" in out, r.describe()
    assert out.index("boot 1") < out.index("boot 2\n") < out.index("boot 3\n"), r.describe()


def test_triple_fault_no_reboot(guests):
    r = run_pyvmm_kvm("--no-reboot", "--kernel", guests["triple_fault"])
    assert r.returncode == 0, r.describe()
    assert "boot 1\n" in r.serial and "boot 2" not in r.serial, r.describe()


# -- ACPI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ncpus", [1, 2])
def test_acpi_tables_and_s5_poweroff(guests, ncpus):
    """Valid ACPI tables (RSDP, RSDT/XSDT, FADT, DSDT \\_S5, MADT, PM timer); S5 -> status 0."""
    r = run_pyvmm_kvm("--smp", str(ncpus), "--kernel", guests["acpi"])
    assert r.returncode == 0, r.describe()
    assert reported(r.serial, "acpi_checks") == "0x3f", r.describe()
    assert reported(r.serial, "madt_cpus") == str(ncpus)
    assert "powering off" in r.serial and "still running" not in r.serial, r.describe()


def test_acpi_reset_register_reboots(guests):
    r = run_pyvmm_kvm("--kernel", guests["acpi"], "--append", "reset=1")
    assert r.returncode == debug_exit_status(0x7F), r.describe()
    assert "boot=2\n" in r.serial, r.describe()


def test_acpi_reset_with_no_reboot_exits(guests):
    r = run_pyvmm_kvm("--no-reboot", "--kernel", guests["acpi"], "--append", "reset=1")
    assert r.returncode == 0, r.describe()
    assert "boot=2" not in r.serial


def test_reset_request_stops_the_cpu_at_once(guests):
    """After the OUT to the reset register no further guest instruction may run (as on hardware/QEMU)."""
    r = run_pyvmm_kvm("--kernel", guests["acpi"], "--append", "reset=1")
    first_boot = r.serial.split("boot=2")[0]
    assert "resetting through the FADT reset register\n" in first_boot, r.describe()
    after = first_boot.split("resetting through the FADT reset register\n")[-1]
    leftover = after.removesuffix("acpi guest\n")  # the second boot's banner
    assert leftover == "", f"guest kept running after requesting a reset (printed {leftover!r}):\n" + r.describe()


# -- guest-controlled addresses outside RAM ----------------------------------------------------

@pytest.mark.parametrize("mem", [64, 128])
def test_out_of_ram_accesses_survive(guests, mem):
    r = run_pyvmm_kvm("-m", f"{mem}M", "--kernel", guests["oob"], "--append", f"pyvmm-test mem={mem}")
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()
    assert "dma survived" in r.serial
    for hole in ("0xd0000000", "0xe0001000", "0xfebff000"):
        assert f"mmio {hole} reads 0xffffffff" in r.serial, r.describe()


def test_io_port_and_mmio_sweep_survives(guests):
    """Every legacy port read, unaligned reads straddling devices, an MMIO sweep up to 4 GiB."""
    r = run_pyvmm_kvm("-m", "128M", "--kernel", guests["ioscan"], "--append", "mem=128")
    assert r.returncode == debug_exit_status(0x0F), r.describe()
    assert reported(r.serial, "mmio_probes") == reported(r.serial, "mmio_reading_ones")


@pytest.mark.parametrize("spelling", ["128", "128M", "131072K", "0.125G", "128MB"])
def test_memory_size_spellings(guests, spelling):
    """QEMU size syntax: a bare number is MiB."""
    r = run_pyvmm_kvm("-m", spelling, "--kernel", guests["multiboot_info"], "--append", mb_cmdline(128, 1, 0))
    assert int(reported(r.serial, "fw_cfg_ram"), 16) == 128 << 20, r.describe()
    assert r.returncode == debug_exit_status(ALL_CHECKS & ~0x08), r.describe()


def test_mem_path_file_backing(guests, initrd_file, tmp_path):
    """--mem-path DIR: guest RAM in a file there (as QEMU with a hugetlbfs mount), same results."""
    r = run_pyvmm_kvm("-m", "128M", "--mem-path", tmp_path, "--kernel", guests["multiboot_info"],
                      "--initrd", initrd_file, "--append", mb_cmdline(128, 1))
    assert r.returncode == debug_exit_status(ALL_CHECKS), r.describe()


# -- bad input: one clear line, non-zero status ------------------------------------------------


def test_many_vcpus_start_and_stop(guests):
    """64 vCPUs (the APs stay in wait-for-SIPI) on a 2-core host: start, exit, tear down."""
    r = run_pyvmm_kvm("--smp", "64", "--kernel", guests["realmode_hello"])
    assert r.returncode == debug_exit_status(0x2A), r.describe()


