"""The default guest's agent: Debian's qemu-ga and the libraries ldd names, and /init starting it."""

from __future__ import annotations

import subprocess

import pytest

from pyvmm.guestkit.agent import GUEST_AGENT_PATH, SHUTDOWN_SCRIPT, find_agent
from pyvmm.guestkit.initramfs import AGENT_PORT, render_init


def test_agent_and_its_libraries_are_found() -> None:
    agent = find_agent()
    if agent is None:
        pytest.fail("qemu-ga is not installed: scripts/bootstrap installs qemu-guest-agent", pytrace=False)
    paths = [guest for guest, _ in agent.files]
    assert paths[0] == GUEST_AGENT_PATH
    assert any(p.endswith("libc.so.6") for p in paths) and any("ld-linux-x86-64" in p for p in paths)
    assert any("libglib-2.0" in p for p in paths)
    assert all(host.is_file() for _, host in agent.files)


def test_init_starts_the_agent_on_its_port_only() -> None:
    init = render_init("6.1.0", [], "pyvmm")
    assert f'"$n" = {AGENT_PORT}' in init and f"/{GUEST_AGENT_PATH} -m virtio-serial" in init


def test_shutdown_stand_in_exits_zero_at_once() -> None:
    # qemu-ga waits for /sbin/shutdown's status; the power-off itself happens in the background.
    r = subprocess.run(["sh", "-n", "-c", SHUTDOWN_SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
