"""Issue 4: hvc0 (virtio-console) carries a shell session on a stock kernel, beside the serial console."""

from __future__ import annotations

import re

import pytest

from support.guestconsole import READY, ConsoleProcess, SocketConsole

pytestmark = pytest.mark.slow


def test_shell_session_on_hvc0(tmp_path) -> None:
    from pyvmm.guestkit import HVC_READY_MARKER, default_guest

    guest = default_guest()
    sock_path = tmp_path / "hvc.sock"
    vm = ConsoleProcess("--accel", "tcg", "--kernel", guest.kernel, "--initrd", guest.initrd,
                        "--append", guest.cmdline + " quiet", "-m", "256M",
                        "--chardev", f"socket,id=hvc,path={sock_path},server=on,wait=off",
                        "--device", "virtio-console,chardev=hvc")
    try:
        hvc = SocketConsole(sock_path, timeout=60, name="hvc0")
        vm.expect(re.escape(READY), 300)
        hvc.wait_for(HVC_READY_MARKER, 60)
        hvc.send("echo tty=$(tty) sum=$((40+2))\n")
        hvc.wait_for("tty=/dev/hvc0 sum=42", 30)
        assert "tty=/dev/hvc0" not in vm.output  # the session is on hvc0, not on the serial port
        hvc.send("poweroff -f\n")
        assert vm.wait(60) == 0
    finally:
        vm.kill()
