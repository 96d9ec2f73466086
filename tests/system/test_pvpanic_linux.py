"""A stock Linux guest that panics stops the VM with GUEST_PANICKED, on pyvmm and (unchanged) on QEMU.

The guest kit's Debian kernel and busybox initramfs, plus the ``pvpanic-mmio``
module (which binds to the ACPI id ``QEMU0001`` and pulls in ``pvpanic``).
Both VMMs get ``-device pvpanic`` and QMP; once the shell is up the test reads
what Linux found (the driver bound to ``QEMU0001:00``, the device's
``capability``/``events`` sysfs files) and the raw ``Device (PEVT)`` node out of
``/sys/firmware/acpi/tables/DSDT``, then crashes the kernel with
``echo c > /proc/sysrq-trigger``.  Linux's panic notifier writes PANICKED to
the port; the VMM must then send the same QMP events with the same data,
end in the same state and exit with the same status as QEMU 7.2:

* default (``-action panic=shutdown``): GUEST_PANICKED {action: poweroff},
  SHUTDOWN {guest: true, reason: guest-panic}, exit status 0;
* ``-action panic=pause``: GUEST_PANICKED {action: pause}, STOP, query-status
  ``guest-panicked`` (not running), until ``quit``.

The guest keeps the kit's ``panic=-1`` (reboot at once after a panic): the
notifier runs before that reboot, and the VMM must not let the reboot happen.

Slow: four tcg boots of a real kernel.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.guestconsole import SocketConsole

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "guests" / "qmp"))

from harness import Client, HarnessError, ensure_qemu  # noqa: E402

pytestmark = pytest.mark.slow

READY = "pyvmm-guest: shell ready"
# Markers are spelt through $M so that the shell's echo of the typed line never matches them.
PROBE = (
    "M=PV; echo ${M}-DRV=$(ls /sys/bus/platform/drivers/pvpanic-mmio | grep QEMU0001) "
    "${M}-CAP=$(cat /sys/bus/platform/devices/QEMU0001:00/capability) "
    "${M}-EVT=$(cat /sys/bus/platform/devices/QEMU0001:00/events) ${M}-END; "
    "echo ${M}-DSDT-BEGIN; od -An -v -tx1 /sys/firmware/acpi/tables/DSDT | tr -d ' \\n'; echo; echo ${M}-DSDT-END\n"
)
PROBE_RE = re.compile(r"PV-DRV=(\S*) PV-CAP=(.*?) PV-EVT=(.*?) PV-END")
DSDT_RE = re.compile(r"PV-DSDT-BEGIN\s*\n([0-9a-f\s]+?)\s*PV-DSDT-END")


@pytest.fixture(scope="module")
def linux():
    from pyvmm.guestkit import DEFAULT_MODULES, default_guest

    guest = default_guest(modules=(*DEFAULT_MODULES, "pvpanic_mmio")).with_cmdline("quiet")
    assert "pvpanic_mmio" in guest.modules and "pvpanic" in guest.modules, guest.modules
    assert "panic=-1" in guest.cmdline
    return guest


def pevt_node(dsdt: bytes) -> bytes:
    """The whole ``Device (PEVT)`` term (ExtOp 0x5b 0x82, PkgLength, NameSeg "PEVT", ...) in a DSDT."""
    for m in re.finditer(rb"\x5b\x82", dsdt):
        lead = dsdt[m.end()]
        nfollow = lead >> 6
        if dsdt[m.end() + 1 + nfollow:m.end() + 5 + nfollow] != b"PEVT":
            continue
        length = lead & (0x3F if nfollow == 0 else 0x0F)
        for i in range(nfollow):
            length |= dsdt[m.end() + 1 + i] << (4 + 8 * i)
        return dsdt[m.start():m.end() + length]
    raise AssertionError("no Device (PEVT) in the DSDT")


class Run:
    """One VMM booting the guest with pvpanic; what the guest and QMP said."""

    def __init__(self, kind: str, linux, workdir: Path, action: str | None) -> None:
        self.kind = kind
        self.serial, self.qmp = workdir / "serial.sock", workdir / "qmp.sock"
        common = ["-kernel", str(linux.kernel), "-initrd", str(linux.initrd), "-append", linux.cmdline,
                  "-m", "256", "-device", "pvpanic",
                  "-serial", f"unix:{self.serial},server=on,wait=off", "-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if action is not None:
            common += ["-action", f"panic={action}"]
        if kind == "pyvmm":
            self.cmd = [sys.executable, "-m", "pyvmm", "run", "--accel", "tcg", *common]
        else:
            self.cmd = [ensure_qemu(), "-accel", "tcg", "-display", "none", "-nodefaults", "-no-user-config",
                        *common]
        self.log = workdir / "stderr.txt"
        self.events: list[tuple[str, dict | None]] = []
        self.status_after: dict | None = None
        self.exit_status: int | None = None
        self.probe: tuple[str, str, str] = ("", "", "")
        self.pevt = b""
        self.console_text = ""

    def run(self) -> None:
        with open(self.log, "wb") as f:
            proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        console: SocketConsole | None = None
        try:
            deadline = time.monotonic() + 60
            while not (self.serial.exists() and self.qmp.exists()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise HarnessError(f"{self.kind} did not start: {self.log.read_text(errors='replace')}")
                time.sleep(0.05)
            console = SocketConsole(self.serial)
            try:
                asyncio.run(self._body(console, proc))
            except AssertionError as e:
                raise AssertionError(f"{self.kind}: {e}\nconsole tail:\n{console.text[-3000:]}\nstderr tail:\n"
                                     f"{self.log.read_text(errors='replace')[-2000:]}") from None
            self.console_text = console.text
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if console is not None:
                console.close()

    async def _body(self, console: SocketConsole, proc: subprocess.Popen) -> None:
        c = Client()
        await c.connect(self.qmp)
        await asyncio.to_thread(console.wait_for, READY, 300)
        console.send(PROBE)
        await asyncio.to_thread(console.wait_for, "PV-DSDT-END", 60)
        m = PROBE_RE.search(console.text)
        assert m, "the probe printed nothing"
        self.probe = (m.group(1), m.group(2).strip(), m.group(3).strip())
        dm = DSDT_RE.search(console.text)
        assert dm, "no DSDT dump"
        self.pevt = pevt_node(bytes.fromhex(re.sub(r"\s", "", dm.group(1))))
        skip = len(c.events)  # start-up events (RESUME or not) are not what this test compares
        console.send("echo c > /proc/sysrq-trigger\n")
        first = await c.wait_event("GUEST_PANICKED", timeout=120, after=skip)
        assert first is not None
        if await asyncio.to_thread(_exits_within, proc, 3.0):
            self.exit_status = proc.returncode
        else:
            await asyncio.sleep(0.5)  # anything that would follow the stop (a reset, a RESUME) shows up
            st = await c.execute("query-status")
            self.status_after = {"status": st["status"], "running": st["running"]}
            await c.execute("quit")
            await c.wait_event("SHUTDOWN", after=skip)
            self.exit_status = await asyncio.to_thread(proc.wait, 30)
        self.events = [(e["event"], e.get("data")) for e in c.events[skip:]]
        await c.close()


def _exits_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.parametrize("action", [None, "pause"])
def test_linux_panic_stops_the_vm_like_qemu(action: str | None, linux, tmp_path: Path) -> None:
    runs = {}
    for kind in ("qemu", "pyvmm"):
        (tmp_path / kind).mkdir()
        r = Run(kind, linux, tmp_path / kind, action)
        r.run()
        runs[kind] = r
    qemu, ours = runs["qemu"], runs["pyvmm"]
    # What Linux found: the same device, bound by pvpanic-mmio, offering PANICKED | CRASH_LOADED.
    assert qemu.probe == ("QEMU0001:00", "3", "3"), qemu.probe  # hex bitmaps: PANICKED | CRASH_LOADED
    assert ours.probe == qemu.probe
    # The DSDT node, byte for byte as QEMU's.
    assert ours.pevt == qemu.pevt, f"pyvmm {ours.pevt.hex()}\nqemu  {qemu.pevt.hex()}"
    assert "Kernel panic - not syncing: sysrq triggered crash" in ours.console_text
    # The same events, state and exit status.
    if action is None:
        assert qemu.events == [("GUEST_PANICKED", {"action": "poweroff"}),
                               ("SHUTDOWN", {"guest": True, "reason": "guest-panic"})]
        assert qemu.status_after is None and qemu.exit_status == 0
    else:
        assert qemu.events == [("GUEST_PANICKED", {"action": "pause"}), ("STOP", None),
                               ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
        assert qemu.status_after == {"status": "guest-panicked", "running": False}
        assert qemu.exit_status == 0
    assert ours.events == qemu.events
    assert ours.status_after == qemu.status_after
    assert ours.exit_status == qemu.exit_status
