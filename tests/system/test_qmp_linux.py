"""system_powerdown with a stock Linux guest, on pyvmm and (unchanged) on QEMU.

The guest kit's kernel and busybox initramfs, plus the ACPI ``button`` and
``evdev`` modules.  Once the shell is up we start what a desktop's logind
does, in one line of shell: open the "Power Button" input device, wait for
an event on it, then sync and power off through ACPI S5.  ``system_powerdown`` must
then end in a SHUTDOWN event with ``guest: true`` and exit status 0.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from support.guestconsole import SocketConsole

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "guests" / "qmp"))

from harness import Client, HarnessError, ensure_qemu  # noqa: E402

READY = "pyvmm-guest: shell ready"
WATCH_POWER_BUTTON = (
    "for e in /sys/class/input/event*; do grep -q 'Power Button' $e/device/name && dev=/dev/input/${e##*/}; done; "
    "(exec 3<$dev; echo armed=$dev; dd bs=24 count=1 of=/dev/null <&3 2>/dev/null; echo POWER-BUTTON-SEEN; "
    "sync; poweroff -f) &\n"
)


@pytest.fixture(scope="module")
def linux():
    from pyvmm.guestkit import DEFAULT_MODULES, default_guest

    return default_guest(modules=(*DEFAULT_MODULES, "button", "evdev")).with_cmdline("quiet")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pyvmm", "qemu"])
def test_linux_guest_powers_off_on_system_powerdown(kind: str, linux, tmp_path: Path) -> None:
    import subprocess

    serial, qmp = tmp_path / "serial.sock", tmp_path / "qmp.sock"
    common = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline, "-m", "256",
              "-serial", f"unix:{serial},server=on,wait=off", "-qmp", f"unix:{qmp},server=on,wait=off"]
    if kind == "pyvmm":
        cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", "auto", *common]
    else:
        cmd = [ensure_qemu(), "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config", *common]
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    try:
        deadline = time.monotonic() + 60
        while not (serial.exists() and qmp.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"{kind} did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)
        console = SocketConsole(serial)

        async def body() -> None:
            c = Client()
            await c.connect(qmp)
            console.wait_for(READY, 240)
            console.send(WATCH_POWER_BUTTON)
            console.wait_for("armed=/dev/input/event", 60)  # the device is open: no press can be missed
            await c.execute("system_powerdown")
            await c.wait_event("POWERDOWN")
            ev = await c.wait_event("SHUTDOWN", timeout=120)
            assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
            await c.close()

        try:
            asyncio.run(body())
        except AssertionError as e:
            raise AssertionError(f"{e}\nconsole tail:\n{console.text[-2000:]}\nstderr tail:\n"
                                 f"{log.read_text(errors='replace')[-2000:]}") from None
        assert proc.wait(60) == 0
        assert "POWER-BUTTON-SEEN" in console.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
