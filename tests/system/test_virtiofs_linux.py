"""virtio-fs: Debian's virtiofsd shares a host directory with a Linux guest (tcg), under pyvmm and QEMU.

Each VMM gets the same options (``pyvmm.vhost_user.virtiofsd.share_options``)::

    -object memory-backend-memfd,id=pyvmm-mem,size=256M,share=on -machine memory-backend=pyvmm-mem
    -chardev socket,id=vfs0,path=SOCK -device vhost-user-fs-pci,chardev=vfs0,tag=hostshare

and its own virtiofsd (the one Debian ships) on a fresh directory.  The guest kit's
guest (which loads ``fuse`` and ``virtiofs``) mounts the tag; a file the host wrote before
boot, one the guest writes, and one the host writes while the guest runs must each be seen
on the other side.  pyvmm runs it over virtio-pci and virtio-mmio; QEMU's pc machine has no
virtio-mmio bus, so it runs the pci row.

The last test kills virtiofsd under a running pyvmm guest: the VMM logs one line, the guest's
next file operation fails with EIO instead of hanging, and the guest and the VMM carry on.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyvmm.guestkit import READY_MARKER, default_guest
from pyvmm.vhost_user.virtiofsd import Virtiofsd, find_virtiofsd, share_options, start_virtiofsd
from support.vmms import vmm_command

pytestmark = pytest.mark.slow

MEMORY = 256 << 20
TAG = "hostshare"
PROMPT_TIMEOUT = 60


class PipeConsole:
    """A VMM whose serial port is its stdin/stdout; keeps what the guest printed."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._out = bytearray()
        self._err = bytearray()
        self._lock = threading.Lock()
        for stream, buf in ((self.proc.stdout, self._out), (self.proc.stderr, self._err)):
            threading.Thread(target=self._pump, args=(stream, buf), daemon=True).start()
        self._mark = 0

    def _pump(self, stream, buf: bytearray) -> None:
        while data := stream.read1(65536):
            with self._lock:
                buf += data

    @property
    def output(self) -> str:
        with self._lock:
            return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.decode(errors="replace")

    def expect(self, pattern: str, timeout: float = PROMPT_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.output, self._mark)
            if m:
                self._mark = m.end()
                return m
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{pattern!r} not seen within {timeout} s (exit {self.proc.poll()})\n"
                                     f"command: {' '.join(self.cmd)}\n--- console ---\n{self.output[-3000:]}\n"
                                     f"--- stderr ---\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    def run(self, command: str, timeout: float = PROMPT_TIMEOUT) -> str:
        """Run one shell command; its output (between two markers the echo cannot match)."""
        self.send(f"echo BEGIN$((6*7)); {command}; echo END$((6*7)) rc=$?\n")
        self.expect("BEGIN42\r?\n", timeout)
        start = self._mark
        m = self.expect(r"END42 rc=(\d+)", timeout)
        return self.output[start:m.start()].replace("\r", "") + f"rc={m.group(1)}"

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _vmm(which: str, daemon: Virtiofsd, transport: str, *, reboot: bool = False) -> PipeConsole:
    g = default_guest()
    assert "virtiofs" in g.modules, f"the guest kit's initramfs loads no virtiofs module: {g.modules}"
    common = ["-kernel", str(g.kernel), "-initrd", str(g.initrd), "-append", f"{g.cmdline} quiet",
              "-m", str(MEMORY >> 20), *([] if reboot else ["-no-reboot"]),
              *share_options([(daemon, TAG)], memory=MEMORY, transport=transport)]
    if which == "qemu":
        return PipeConsole([*vmm_command("qemu"), "-accel", "tcg", "-nographic", "-nodefaults", "-serial", "stdio",
                            *common])
    return PipeConsole([*vmm_command("pyvmm"), "-accel", "tcg", *common])  # PYVMM_TEST_SANDBOX=1: -sandbox on


@pytest.fixture
def share(tmp_path: Path):
    find_virtiofsd()  # a clear failure when it is not installed
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host.txt").write_text("written by the host before boot\n")
    daemon = start_virtiofsd(str(shared), str(tmp_path / "vfs.sock"))
    yield shared, daemon
    daemon.stop()


def _mount(vm: PipeConsole) -> None:
    vm.expect(re.escape(READY_MARKER), 300)
    out = vm.run(f"mkdir -p /mnt/s && mount -t virtiofs {TAG} /mnt/s && grep virtiofs /proc/mounts")
    assert f"{TAG} /mnt/s virtiofs" in out and out.endswith("rc=0"), out


@pytest.mark.parametrize("which,transport", [("pyvmm", "pci"), ("pyvmm", "mmio"), ("qemu", "pci")])
def test_a_file_written_on_either_side_is_seen_on_the_other(share, which: str, transport: str) -> None:
    shared, daemon = share
    vm = _vmm(which, daemon, transport)
    try:
        _mount(vm)
        bus = vm.run("basename $(dirname $(dirname $(readlink -f /sys/bus/virtio/drivers/virtiofs/virtio*)))")
        if which == "pyvmm":  # the device is on the transport asked for
            assert ("pci" in bus) == (transport == "pci"), bus
        out = vm.run("cat /mnt/s/from-host.txt")
        assert out == "written by the host before boot\nrc=0", out
        out = vm.run("echo written by the guest > /mnt/s/from-guest.txt && sync")
        assert out.endswith("rc=0"), out
        assert (shared / "from-guest.txt").read_text() == "written by the guest\n"
        payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
        (shared / "later.bin").write_bytes(payload)
        out = vm.run("md5sum /mnt/s/later.bin; ls /mnt/s")
        assert hashlib.md5(payload).hexdigest() in out, out
        assert "from-guest.txt" in out and "later.bin" in out, out
        out = vm.run("dd if=/dev/urandom of=/mnt/s/guest.bin bs=64k count=16 2>/dev/null && md5sum /mnt/s/guest.bin")
        assert hashlib.md5((shared / "guest.bin").read_bytes()).hexdigest() in out, out
        vm.send("umount /mnt/s && poweroff -f\n")
        assert vm.wait(60) == 0, vm.stderr[-2000:]
        assert daemon.alive() or daemon.process.returncode == 0
    finally:
        vm.kill()


def test_backend_killed_mid_run_gives_eio_not_a_hang(share) -> None:
    shared, daemon = share
    (shared / "never-read.txt").write_text("x\n")
    vm = _vmm("pyvmm", daemon, "pci")
    try:
        _mount(vm)
        assert vm.run("cat /mnt/s/from-host.txt").endswith("rc=0")
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
        out = vm.run("cat /mnt/s/never-read.txt", timeout=60)
        assert "Input/output error" in out and not out.endswith("rc=0"), out
        out = vm.run("ls /mnt/s; echo guest still here", timeout=60)
        assert "guest still here" in out, out
        deadline = time.monotonic() + 10
        while "is gone" not in vm.stderr and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = [line for line in vm.stderr.splitlines() if "is gone" in line]
        assert len(gone) == 1, vm.stderr[-2000:]
        assert "Traceback" not in vm.stderr, vm.stderr[-3000:]
        vm.send("poweroff -f\n")
        assert vm.wait(60) == 0, vm.stderr[-2000:]
    finally:
        vm.kill()


def test_the_share_survives_a_guest_reboot(share) -> None:
    """A reboot resets the device (the back end's rings stop: GET_VRING_BASE) and the new driver
    hands them over again; the same virtiofsd keeps serving."""
    shared, daemon = share
    vm = _vmm("pyvmm", daemon, "pci", reboot=True)
    try:
        _mount(vm)
        assert vm.run("echo one > /mnt/s/boot1.txt").endswith("rc=0")
        vm.send("reboot -f\n")
        _mount(vm)
        out = vm.run("cat /mnt/s/boot1.txt /mnt/s/from-host.txt")
        assert out == "one\nwritten by the host before boot\nrc=0", out
        vm.send("poweroff -f\n")
        assert vm.wait(60) == 0, vm.stderr[-2000:]
        assert "is gone" not in vm.stderr
    finally:
        vm.kill()
