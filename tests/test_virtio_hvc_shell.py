"""Issue 4: hvc0 (virtio-console) carries a shell session on a stock kernel, beside the serial console."""

from __future__ import annotations

import re
import socket
import time

import pytest

from guestconsole import READY, ConsoleProcess, wait_for_file

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
        wait_for_file(sock_path, 60)
        hvc = socket.socket(socket.AF_UNIX)
        hvc.connect(str(sock_path))
        hvc.settimeout(0.2)
        vm.expect(re.escape(READY), 300)
        received = b""

        def until(pattern: bytes, timeout: float) -> None:
            nonlocal received
            deadline = time.monotonic() + timeout
            while not re.search(pattern, received):
                assert time.monotonic() < deadline, f"{pattern!r} not on hvc0; got {received[-800:]!r}"
                try:
                    received += hvc.recv(65536)
                except TimeoutError:
                    pass

        until(re.escape(HVC_READY_MARKER.encode()), 60)
        hvc.sendall(b"echo tty=$(tty) sum=$((40+2))\n")
        until(rb"tty=/dev/hvc0 sum=42", 30)
        assert "tty=/dev/hvc0" not in vm.output  # the session is on hvc0, not on the serial port
        hvc.sendall(b"poweroff -f\n")
        assert vm.wait(60) == 0
    finally:
        vm.kill()
