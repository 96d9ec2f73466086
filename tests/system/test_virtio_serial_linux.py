"""virtio-serial multiport: named ports and a virtconsole, under pyvmm (tcg) and QEMU, same options.

The guest (the guest kit's default, running a script through ``pyvmm_run``) waits for its
named port, lists the port names the driver learnt (PORT_NAME), answers one line the host
sent before the guest opened the port (held back until PORT_OPEN), and reports whether the
virtconsole became an hvc device (CONSOLE_PORT).  The same transcript is expected from both.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm.guestkit import default_guest
from support.guestconsole import connect_unix

pytestmark = pytest.mark.slow

PORT = "org.pyvmm.test.0"
SCRIPT = (f"for i in $(seq 300); do [ -e /dev/virtio-ports/{PORT} ] && break; sleep 0.1; done; "
          "echo NAMES $(cat /sys/class/virtio-ports/*/name | sort); "
          f"exec 3<>/dev/virtio-ports/{PORT}; read -r line <&3; echo \"pong:$line\" >&3; "
          "echo GOT $line; [ -c /dev/hvc0 ] && echo HVC0 yes; sleep 0.5")
TIMEOUT = 300


def _command(kind: str, sock: Path) -> list[str]:
    g = default_guest()
    if kind == "qemu":
        qemu = shutil.which("qemu-system-x86_64")
        assert qemu, "qemu-system-x86_64 is needed: apt-get install qemu-system-x86"
        cmd = [qemu, "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"]
    else:
        cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", "tcg", "-m", "256M"]
    return cmd + ["-kernel", str(g.kernel), "-initrd", str(g.initrd),
                  "-append", f'{g.cmdline} quiet pyvmm_run="{SCRIPT}"',
                  "-chardev", f"socket,id=port0,path={sock},server=on,wait=off",
                  "-chardev", "null,id=con0",
                  "-device", "virtio-serial-pci,id=vser0",
                  "-device", f"virtserialport,chardev=port0,name={PORT}",
                  "-device", "virtserialport,bus=vser0.0,name=org.pyvmm.other.1",
                  "-device", "virtconsole,chardev=con0"]


def _host_side(sock_path: Path, result: dict[str, str]) -> None:
    s = connect_unix(sock_path, 60)
    s.settimeout(TIMEOUT)
    try:
        s.sendall(b"hello from the host\n")
        data = b""
        while b"\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        result["reply"] = data.decode(errors="replace")
    except OSError as e:
        result["reply"] = f"error: {e}"
    finally:
        s.close()


def _run(kind: str, tmp: Path, out: dict[str, tuple[subprocess.CompletedProcess[str], str]]) -> None:
    sock = tmp / f"{kind}.sock"
    host: dict[str, str] = {}
    proc = subprocess.Popen(_command(kind, sock), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t = threading.Thread(target=_host_side, args=(sock, host), daemon=True)
    t.start()
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    t.join(5)
    out[kind] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), host.get("reply", ""))


def _transcript(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert "pyvmm-guest: exit status 0" in r.stdout, f"{r.args}\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    return [line.strip() for line in r.stdout.splitlines() if line.startswith(("NAMES", "GOT", "HVC0"))]


def test_named_ports_and_virtconsole_as_under_qemu(tmp_path: Path) -> None:
    out: dict[str, tuple[subprocess.CompletedProcess[str], str]] = {}
    threads = [threading.Thread(target=_run, args=(k, tmp_path, out)) for k in ("qemu", "pyvmm")]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + 30)
    assert set(out) == {"qemu", "pyvmm"}, f"a boot raised ({time.monotonic() - start:.0f}s)"
    theirs, ours = _transcript(out["qemu"][0]), _transcript(out["pyvmm"][0])
    assert theirs == [f"NAMES org.pyvmm.other.1 {PORT}", "GOT hello from the host", "HVC0 yes"], theirs
    assert ours == theirs
    assert out["pyvmm"][1] == out["qemu"][1] == "pong:hello from the host\n"
