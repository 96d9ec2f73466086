"""A stock Linux kernel accepts our ACPI tables (checked on QEMU, independently of pyvmm).

QEMU's ``pc`` machine has a PIIX4 power-management block at port 0x600 with
the same register layout as :mod:`pyvmm.devices.acpi_pm` (S5 = SLP_TYP 0,
SCI on IRQ 9).  We load *our* tables into guest RAM with QEMU's generic
loader and point Linux at them with ``acpi_rsdp=``; Linux then finds its CPUs
and interrupt controllers through our MADT, its PM registers through our FADT,
the PCI host bridge and ``\\_S5`` through our DSDT.  A QMP power-button press
must reach the guest as an SCI, and ``poweroff -f`` must make QEMU exit 0.

Slow (about 10 s of TCG); needs qemu-system-x86 and the guest kit's kernel.
"""

from __future__ import annotations

import json
import lzma
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyvmm.guestkit.busybox import find_busybox
from pyvmm.guestkit.cpio import write_archive_file
from pyvmm.guestkit.kernel import obtain_kernel
from pyvmm.x86 import acpi as acpi_tables

pytestmark = pytest.mark.slow

TABLES_GPA = 0x700_0000  # RAM QEMU leaves alone; Linux reserves the tables it finds
TIMEOUT = 120.0
WAIT_MARKER = "PYVMM-ACPI-WAIT"

INIT = f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
insmod /lib/button.ko
echo "ACPIDEVS: $(ls /sys/bus/acpi/devices | tr '\\n' ' ')"
echo {WAIT_MARKER}
i=0
while [ $i -lt 200 ]; do
  set -- $(cat /sys/firmware/acpi/interrupts/ff_pwr_btn)
  if [ "$1" != "0" ]; then echo "PWRBTN-COUNT=$1"; break; fi
  sleep 0.2; i=$((i+1))
done
grep acpi /proc/interrupts
echo PYVMM-ACPI-POWEROFF
poweroff -f
"""


def _button_module(modules_dir: Path) -> bytes:
    for path in sorted(modules_dir.rglob("button.ko*")):
        if path.parent.name != "acpi":
            continue
        if path.name == "button.ko":
            return path.read_bytes()
        if path.name == "button.ko.xz":
            return lzma.decompress(path.read_bytes())
    pytest.fail(f"no usable drivers/acpi/button.ko under {modules_dir}")


def _initramfs(path: Path) -> None:
    kernel = obtain_kernel()
    if kernel.modules_dir is None:
        pytest.fail(f"kernel {kernel.release} came without modules (button.ko is needed)")
    busybox = find_busybox().path.read_bytes()
    button = _button_module(kernel.modules_dir)

    def fill(w) -> None:
        w.add_file("bin/busybox", busybox, 0o755)
        for applet in ("sh", "mount", "cat", "ls", "tr", "grep", "sleep", "echo", "insmod", "poweroff"):
            w.add_symlink(f"bin/{applet}", "busybox")
        for d in ("proc", "sys", "dev"):
            w.add_dir(d)
        w.add_file("lib/button.ko", button)
        w.add_file("init", INIT.encode(), 0o755)

    write_archive_file(path, fill)


def _qmp(sock_path: Path, command: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        f = s.makefile("rw")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())):
                if "error" in reply:
                    raise AssertionError(f"QMP {cmd}: {reply}")


def test_linux_boots_with_our_tables_and_powers_off(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is needed: apt-get install qemu-system-x86"
    img = acpi_tables.build_tables(ncpus=2, pm_base=0x600, base_gpa=TABLES_GPA, pci=acpi_tables.AcpiPciHost())
    (tmp_path / "tables.bin").write_bytes(img.data)
    _initramfs(tmp_path / "initrd.cpio")
    kernel = obtain_kernel()
    qmp_sock = tmp_path / "qmp.sock"
    args = [
        qemu, "-M", "pc", "-accel", "tcg", "-smp", "2", "-m", "256", "-nographic", "-no-reboot",
        "-nodefaults", "-serial", "stdio", "-kernel", str(kernel.vmlinuz), "-initrd", str(tmp_path / "initrd.cpio"),
        "-append", f"console=ttyS0 nokaslr panic=-1 acpi_rsdp={TABLES_GPA:#x}",
        "-device", f"loader,file={tmp_path / 'tables.bin'},addr={TABLES_GPA:#x},force-raw=on",
        "-qmp", f"unix:{qmp_sock},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = bytearray()
    lock = threading.Lock()

    def pump() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            with lock:
                out.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def text() -> str:
        with lock:
            return out.decode(errors="replace")

    try:
        deadline = time.monotonic() + TIMEOUT
        while WAIT_MARKER not in text():
            assert proc.poll() is None, f"QEMU exited early ({proc.returncode}):\n{text()[-4000:]}"
            assert time.monotonic() < deadline, f"guest never got to userspace:\n{text()[-4000:]}"
            time.sleep(0.2)
        _qmp(qmp_sock, "system_powerdown")
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    log = text()
    assert rc == 0, f"QEMU exit status {rc}:\n{log[-4000:]}"
    assert f"ACPI: RSDP 0x{TABLES_GPA:016X} 000024 (v02 PYVMM )" in log, log[-4000:]
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in log
    assert "smp: Brought up 1 node, 2 CPUs" in log
    assert "INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)" in log
    assert "ACPI: PM-Timer IO Port: 0x608" in log
    assert "ACPI: PM: (supports S0 S5)" in log
    assert "ACPI: PCI Root Bridge [PCI0]" in log
    assert re.search(r"ACPIDEVS: .*ACPI0007:01 .*LNXPWRBN:00 .*PNP0A03:00", log), log[-3000:]
    assert re.search(r"PWRBTN-COUNT=[1-9]", log), f"power button never reached the guest:\n{log[-3000:]}"
    assert re.search(r"9:\s+\d+\s+\d+\s+IO-APIC\s+9-fasteoi\s+acpi", log), log[-3000:]
    assert "ACPI: PM: Preparing to enter system sleep state S5" in log
    for bad in ("ACPI Error", "ACPI BIOS Error", "ACPI Warning", "ACPI BIOS Warning"):
        assert bad not in log, f"Linux complains about our tables:\n{log[-4000:]}"
