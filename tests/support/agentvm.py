"""Boot the guest kit's default guest with a QGA port, under pyvmm or QEMU, with the same options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pyvmm.guestkit import default_guest
from support.vmms import qemu_binary

AGENT_PORT = "org.qemu.guest_agent.0"


def agent_vm_command(kind: str, sock: Path, *, memory_mb: int = 256, extra_append: str = "") -> list[str]:
    """``kind`` ("pyvmm" or "qemu") booting the default guest on tcg, qemu-ga on the socket ``sock``."""
    g = default_guest()
    if kind == "qemu":
        cmd = [qemu_binary(), "-accel", "tcg", "-m", str(memory_mb), "-nographic", "-no-reboot", "-nodefaults",
               "-serial", "stdio"]
    else:
        cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", "tcg", "-m", f"{memory_mb}M"]
    return cmd + ["-kernel", str(g.kernel), "-initrd", str(g.initrd),
                  "-append", f"{g.cmdline} quiet {extra_append}".strip(),
                  "-chardev", f"socket,id=qga0,path={sock},server=on,wait=off",
                  "-device", "virtio-serial-pci",
                  "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}"]


def start_agent_vm(kind: str, sock: Path, log: Path, **kw: object) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    try:
        return subprocess.Popen(agent_vm_command(kind, sock, **kw),  # type: ignore[arg-type]
                                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()
