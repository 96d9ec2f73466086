"""Cross-check the default guest with QEMU (TCG), independently of pyvmm.

If these pass, the kernel + initramfs from ``default_guest()`` are sound, so a
pyvmm boot failure is pyvmm's fault.  Needs ``qemu-system-x86`` (Debian
package); the first run also downloads the kernel into the user cache.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyvmm.guestkit import READY_MARKER, GuestImages, default_guest

BOOT_TIMEOUT = 90.0


class SerialSession:
    """QEMU with the guest's serial console on stdin/stdout."""

    def __init__(self, guest: GuestImages) -> None:
        qemu = shutil.which("qemu-system-x86_64")
        assert qemu, "qemu-system-x86_64 is needed: apt-get install qemu-system-x86"
        args = [
            qemu, "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-nodefaults",
            "-serial", "stdio", "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", guest.cmdline,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            with self._lock:
                self._buf += chunk

    @property
    def output(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.output, start)
            if m:
                return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        tail = self.output[-3000:]
        raise AssertionError(f"guest never printed {pattern!r} within {timeout:.0f}s; output tail:\n{tail}")

    def send(self, line: str) -> int:
        """Type a line; returns the output offset to search from for its result."""
        mark = len(self.output)
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return mark

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait(10)
        self._reader.join(5)
        return rc


@pytest.fixture(scope="module")
def guest() -> GuestImages:
    return default_guest()


@pytest.mark.slow
def test_boots_to_shell_and_powers_off(guest: GuestImages) -> None:
    assert guest.cmdline.startswith("console=ttyS0 panic=-1")
    assert guest.kernel_info is not None
    release = guest.kernel_info.release
    s = SerialSession(guest)
    try:
        s.wait_for(re.escape(READY_MARKER))
        s.wait_for(r"~ # ")
        mark = s.send("uname -a")
        s.wait_for(rf"Linux pyvmm {re.escape(release)} .* x86_64", timeout=20, start=mark)
        mark = s.send("echo MODS $(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ') END")
        mods = s.wait_for(r"(?m)^MODS ([^\r\n]*) END", timeout=20, start=mark).group(1).split()
        assert guest.modules, "the cloud kernel ships the virtio drivers as modules"
        assert set(guest.modules) <= set(mods), f"not loaded: {set(guest.modules) - set(mods)}"
        mark = s.send("echo MOUNTS $(cut -d' ' -f2,3 /proc/mounts | tr ' \\n' ':,') END")
        mounts = s.wait_for(r"(?m)^MOUNTS ([^\r\n]*) END", timeout=20, start=mark).group(1)
        for m in ("/proc:proc", "/sys:sysfs", "/dev:devtmpfs", "/tmp:tmpfs"):
            assert m in mounts, mounts
        mark = s.send("tty; hostname")
        s.wait_for(r"/dev/ttyS0\s+pyvmm", timeout=20, start=mark)
        s.send("poweroff -f")
        s.wait_for(r"reboot: Power down", timeout=30)
        assert s.proc.wait(30) == 0
    finally:
        s.close()
    assert "Kernel panic" not in s.output


@pytest.mark.slow
def test_noninteractive_command_then_poweroff(guest: GuestImages) -> None:
    s = SerialSession(guest.with_cmdline('pyvmm_run="cat /proc/version; false"'))
    try:
        s.wait_for(r"Linux version \S+")
        s.wait_for(r"pyvmm-guest: exit status 1")
        s.wait_for(r"reboot: Power down", timeout=30)
        assert s.proc.wait(30) == 0
    finally:
        s.close()
    assert READY_MARKER not in s.output


def test_images_are_cached(guest: GuestImages) -> None:
    again = default_guest()
    assert (again.kernel, again.initrd) == (guest.kernel, guest.initrd)
    assert Path(again.initrd).stat().st_mtime == Path(guest.initrd).stat().st_mtime


@pytest.mark.slow
def test_extracted_vmlinux_boots_via_pvh(guest: GuestImages) -> None:
    """The unpacked ELF vmlinux boots through its PVH entry (QEMU loads it like a VMM would)."""
    from dataclasses import replace

    from pyvmm.guestkit.vmlinux import vmlinux_for

    assert guest.kernel_info is not None
    elf_guest = replace(guest, kernel=vmlinux_for(guest.kernel_info)).with_cmdline('pyvmm_run="uname -r"')
    s = SerialSession(elf_guest)
    try:
        s.wait_for(rf"(?m)^{re.escape(guest.kernel_info.release)}\r?$")
        s.wait_for(r"pyvmm-guest: exit status 0")
        s.wait_for(r"reboot: Power down", timeout=30)
        assert s.proc.wait(30) == 0
    finally:
        s.close()
