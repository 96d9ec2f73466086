"""Issue 3's acceptance: a stock Debian kernel boots on tcg to a shell driven over the serial console.

One boot, several commands, then ``poweroff -f`` must end the process with status 0.  The
machine is started with no ``--accel`` so that ``auto`` has to choose (and explain) itself.
"""

from __future__ import annotations

import re

import pytest

from support.guestconsole import PROMPT, READY, ConsoleProcess

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 300


@pytest.fixture(scope="module")
def guest():
    from pyvmm.guestkit import default_guest

    return default_guest()


@pytest.fixture(scope="module")
def kvm_native() -> bool:
    from pyvmm.accel.select import probe_kvm

    return probe_kvm()[0]


def test_stock_kernel_shell_session(guest, kvm_native) -> None:
    console = ConsoleProcess("--kernel", guest.kernel, "--initrd", guest.initrd, "--append", guest.cmdline,
                             "-m", "512M")
    try:
        console.expect(re.escape(READY), BOOT_TIMEOUT)
        console.expect(re.escape(PROMPT), 60)
        expected = "kvm" if kvm_native else "tcg"
        assert re.search(rf"accelerator: {expected} \(.+\)", console.stderr), console.stderr

        uname = console.run("uname -a")
        assert re.search(r"^Linux pyvmm 6\.\d+\.\d+-\S+-cloud-amd64 .* x86_64", uname, re.M), uname

        cpuinfo = console.run("cat /proc/cpuinfo")
        assert re.search(r"^processor\s+: 0$", cpuinfo, re.M), cpuinfo
        assert re.search(r"^flags\s+: .*\bfpu\b.*\bsse2\b", cpuinfo, re.M), cpuinfo
        assert re.search(r"^vendor_id\s+: \S+", cpuinfo, re.M), cpuinfo

        assert console.run("echo $(( (17 * 3 + 9) / 4 ))") == "15"

        console.run("seq 1 500 > /tmp/numbers && sync")
        assert console.run("wc -l < /tmp/numbers") == "500"
        assert console.run("awk '{s+=$1} END {print s}' /tmp/numbers") == "125250"
        assert "tmpfs" in console.run("grep ' /tmp ' /proc/mounts")

        console.send("poweroff -f\n")
        assert console.wait(60) == 0
        assert "Power down" in console.output
    finally:
        console.kill()


def test_guest_triple_fault_no_reboot_exits_cleanly(guest) -> None:
    """A Linux guest asked to reboot through the keyboard controller: --no-reboot ends the process with 0."""
    console = ConsoleProcess("--accel", "tcg", "--kernel", guest.kernel, "--initrd", guest.initrd,
                             "--append", guest.cmdline + " reboot=k quiet", "-m", "256M", "--no-reboot")
    try:
        console.expect(re.escape(READY), BOOT_TIMEOUT)
        console.send("reboot -f\n")
        assert console.wait(60) == 0
        assert "reset" in console.stderr, console.stderr
    finally:
        console.kill()


def test_guest_reboot_triple_no_reboot_exits_cleanly(guest) -> None:
    """`reboot=triple` (lidt of an empty IDT, then int3) must triple-fault: --no-reboot exits 0."""
    console = ConsoleProcess("--accel", "tcg", "--kernel", guest.kernel, "--initrd", guest.initrd,
                             "--append", guest.cmdline + " reboot=triple quiet", "-m", "256M", "--no-reboot")
    try:
        console.expect(re.escape(READY), BOOT_TIMEOUT)
        console.send("reboot -f\n")
        assert console.wait(60) == 0
        assert "triple fault" in console.stderr, console.stderr
    finally:
        console.kill()
