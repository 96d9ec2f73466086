"""Stock libvirt 9.0 (virsh, virt-install, libvirt-python) drives pyvmm as it drives QEMU.

One scenario, run twice in a private libvirtd (tests/support/libvirt_env.py): with
``qemu-system-x86_64`` as ``<emulator>`` (the reference) and with ``pyvmm-system-x86_64``.
The domain boots the guest kit's kernel directly, with 256 MiB, one virtio disk, a virtio NIC on
a tap libvirt opens, a pty serial console and no USB, balloon or graphics.  Each step must pass
on both; the pass table is printed (``-s`` shows it), and libvirtd must still be alive at the end.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from support.libvirt_env import LibvirtEnv, PtyProcess
from support.vmms import qemu_binary

PYVMM_EMULATOR = Path(sys.executable).with_name("pyvmm-system-x86_64")
PROMPT = r"~ # "
#: The domain's NIC: libvirt opens a tap and passes it (-netdev tap,fd=N,vhost=off + -device virtio-net-pci).
MAC = "52:54:00:6c:76:01"
#: libvirt's capability probe of the emulator (virsh domcapabilities starts it) must finish within this.
PROBE_LIMIT = 2.0


def emulator_path(kind: str) -> str:
    if kind == "qemu":
        return qemu_binary()
    if not PYVMM_EMULATOR.exists():
        pytest.fail(f"{PYVMM_EMULATOR} is missing: run scripts/bootstrap (pip install -e .)", pytrace=False)
    return str(PYVMM_EMULATOR)


@pytest.fixture(scope="module")
def guest():
    from pyvmm.guestkit import default_guest

    return default_guest()


def domain_xml(name: str, emulator: str, guest, disk: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(guest.kernel))}</kernel>
    <initrd>{escape(str(guest.initrd))}</initrd>
    <cmdline>{escape(guest.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(emulator)}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{escape(str(disk))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <interface type='ethernet'>
      <target dev='{name[:9]}-tap' managed='yes'/>
      <mac address='{MAC}'/>
      <model type='virtio'/>
      <driver name='qemu'/>
    </interface>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Steps:
    """The pass table: each step runs, is timed and recorded; the first failure ends the test."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.rows: list[tuple[str, str, float]] = []

    def run(self, name: str, fn: Callable[[], object]) -> object:
        t = time.monotonic()
        try:
            result = fn()
        except BaseException:
            self.rows.append((name, "FAIL", time.monotonic() - t))
            self.print()
            raise
        self.rows.append((name, "pass", time.monotonic() - t))
        return result

    def print(self) -> None:
        print(f"\nlibvirt scenario, emulator {self.kind}:")
        for name, result, secs in self.rows:
            print(f"  {name:<28} {result:<5} {secs:6.2f} s")


def dom_state(env: LibvirtEnv, name: str) -> str:
    return env.virsh("domstate", name).stdout.strip()


def wait_state(env: LibvirtEnv, name: str, want: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = dom_state(env, name)
        if state == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"{name}: state {state!r} after {timeout:.0f} s, expected {want!r}\n"
                         f"--- domain log:\n{env.domain_log(name)}")


def console_session(env: LibvirtEnv, name: str, boot_timeout: float) -> PtyProcess:
    """``virsh console`` until the guest's shell prompt answers."""
    con = PtyProcess(["virsh", "-c", env.uri, "console", name, "--force"])
    try:
        con.expect(r"Escape character is", 30)
        deadline = time.monotonic() + boot_timeout
        while True:
            con.send("\r")
            try:
                con.expect(PROMPT, 3)
                break
            except AssertionError:
                if con.eof or time.monotonic() > deadline:
                    raise
        con.send("stty cols 400\r")  # long command lines must not wrap
        con.expect(PROMPT, 10)
        return con
    except BaseException:
        print(env.domain_log(name))
        con.close()
        raise


def shell(con: PtyProcess, command: str, timeout: float = 30) -> str:
    mark = f"{time.monotonic_ns() % 100000}"
    con.send(f"{command}; echo @@\"\"{mark}\r")  # the echoed line says @@""N, the output @@N
    con.expect(re.escape(f'@@""{mark}'), timeout)
    return con.expect(rf"(?s)(.*?)@@{mark}\r?\n", timeout).group(1)


_LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\+0000: "


def probe_seconds(env: LibvirtEnv, emulator: str) -> float:
    """libvirt's probe of ``emulator`` (virsh domcapabilities starts it), from libvirtd's log: each run of
    the emulator from qemuProcessQMPNew to qemuProcessQMPStop (one with KVM, one with TCG if KVM works)."""
    from datetime import datetime

    env.virsh("domcapabilities", "--emulatorbin", emulator, "--virttype", "qemu", "--machine", "pc")
    lines = (env.dirs["log"] / "libvirt" / "libvirtd.log").read_text(errors="replace").splitlines()
    total, start, runs = 0.0, None, 0
    for line in lines:
        m = re.match(_LOG_TIME, line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if "qemuProcessQMPNew" in line and f"exec={emulator}," in line:
            start = when
        elif "qemuProcessQMPStop" in line and start is not None:
            total, start, runs = total + when - start, None, runs + 1
    assert runs, f"no capability probe of {emulator} in libvirtd's log"
    return total


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["qemu", "pyvmm"])
def test_libvirt_scenario(kind: str, guest, tmp_path: Path) -> None:
    emulator = emulator_path(kind)
    env = LibvirtEnv(tmp_path / "libvirt")
    steps = Steps(kind)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    name = f"lv-{kind}"
    env.start()
    try:
        probe = steps.run("capability probe", lambda: probe_seconds(env, emulator))
        print(f"\n{kind}: libvirt capability probe {probe:.2f} s")
        xml = tmp_path / "domain.xml"
        xml.write_text(domain_xml(name, emulator, guest, disk))
        steps.run("define", lambda: env.virsh("define", str(xml)))
        steps.run("start", lambda: env.virsh("start", name))

        def console() -> None:
            con = console_session(env, name, 240)
            try:
                assert guest.kernel_info.release in shell(con, "uname -r")
                assert "vda" in shell(con, "ls /sys/block").split()
                assert MAC in shell(con, "cat /sys/class/net/eth0/address").split()
            finally:
                con.close()

        steps.run("console: prompt, uname, vda, eth0", console)
        steps.run("dominfo running", lambda: _expect(env.virsh("dominfo", name).stdout, r"State:\s+running"))
        steps.run("suspend", lambda: (env.virsh("suspend", name), wait_state(env, name, "paused", 10)))
        steps.run("resume", lambda: (env.virsh("resume", name), wait_state(env, name, "running", 10)))
        steps.run("domblkstat vda", lambda: _expect(env.virsh("domblkstat", name, "vda").stdout,
                                                     r"vda rd_req \d+"))
        steps.run("vcpuinfo", lambda: _vcpu_thread_real(env, name))
        steps.run("save, restore", lambda: _save_restore(env, name, tmp_path / "saved.img"))
        steps.run("shutdown", lambda: (env.virsh("shutdown", name), wait_state(env, name, "shut off", 120)))
        steps.run("start again", lambda: (env.virsh("start", name), wait_state(env, name, "running", 30)))

        def reboot() -> None:
            con = console_session(env, name, 240)
            try:
                env.virsh("reboot", name)
                con.expect(r"Linux version", 120)  # the kernel boots again
                con.expect(r"shell ready", 240)
            finally:
                con.close()
            wait_state(env, name, "running", 10)

        steps.run("reboot", reboot)
        steps.run("destroy", lambda: (env.virsh("destroy", name), wait_state(env, name, "shut off", 30)))
        steps.run("undefine", lambda: env.virsh("undefine", name))
        steps.run("virt-install", lambda: _virt_install(env, emulator, guest, tmp_path, f"vi-{kind}"))
        steps.run("libvirt-python", lambda: _libvirt_python(env, f"vi-{kind}"))
        steps.run("libvirtd alive", lambda: _assert(env.alive(), "libvirtd died"))
        steps.print()
        assert probe < PROBE_LIMIT, f"capability probe took {probe:.2f} s (limit {PROBE_LIMIT} s)"
    finally:
        for dom in (name, f"vi-{kind}"):
            env.virsh("destroy", dom, check=False)
            env.virsh("undefine", dom, check=False)
        env.stop()


def _assert(ok: bool, what: str) -> None:
    assert ok, what


def _expect(text: str, pattern: str) -> None:
    assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"


def _vcpu_thread_real(env: LibvirtEnv, name: str) -> None:
    """vcpuinfo shows vCPU 0 running on a host CPU, and its thread id is a thread of the emulator."""
    out = env.virsh("vcpuinfo", name).stdout
    _expect(out, r"VCPU:\s+0")
    _expect(out, r"CPU:\s+\d+")
    pid = int((env.dirs["run"] / "libvirt" / "qemu" / f"{name}.pid").read_text().strip())
    xml = env.virsh("qemu-monitor-command", name, '{"execute":"query-cpus-fast"}').stdout
    tid = int(re.search(r'"thread-id":\s*(\d+)', xml).group(1))
    assert Path(f"/proc/{pid}/task/{tid}").exists(), f"vCPU thread {tid} is not a thread of {pid}"
    assert tid != pid, "vCPU 0 reported as the main thread"


def _save_restore(env: LibvirtEnv, name: str, path: Path) -> None:
    """``virsh save`` (getfd + migrate fd:NAME) stops the domain; ``virsh restore`` (-incoming defer +
    migrate-incoming fd:N) brings it back running, with what the guest had in RAM."""
    con = console_session(env, name, 60)
    try:
        assert "saved-42" in shell(con, "echo saved-$((6*7)) > /tmp/mark; cat /tmp/mark")
    finally:
        con.close()
    env.virsh("save", name, str(path))
    assert dom_state(env, name) == "shut off"
    assert path.stat().st_size > 1 << 20
    env.virsh("restore", str(path))
    wait_state(env, name, "running", 30)
    con = console_session(env, name, 60)
    try:
        assert "saved-42" in shell(con, "cat /tmp/mark")
    finally:
        con.close()


def _virt_install(env: LibvirtEnv, emulator: str, guest, tmp_path: Path, name: str) -> None:
    if shutil.which("virt-install") is None:
        pytest.fail("virt-install missing: run scripts/bootstrap (virtinst)", pytrace=False)
    disk = tmp_path / f"{name}.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    cmd = ["virt-install", "--connect", env.uri, "--name", name, "--memory", "256", "--vcpus", "1",
           "--virt-type", "qemu", "--machine", "pc", "--arch", "x86_64", "--import",
           "--boot", f"kernel={guest.kernel},initrd={guest.initrd},kernel_args={guest.cmdline}",
           "--disk", f"path={disk},format=raw,bus=virtio", "--network", "none", "--graphics", "none",
           "--controller", "usb,model=none", "--memballoon", "none", "--console", "pty,target_type=serial",
           "--osinfo", "detect=on,require=off", "--noautoconsole", "--noreboot",
           "--xml", "./devices/emulator=" + emulator, "--xml", "xpath.delete=./clock/timer",
           "--check", "all=off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"virt-install failed: {proc.stderr}\n{proc.stdout}\n{env.log_tail()}"
    env.virsh("start", name)
    wait_state(env, name, "running", 30)


LIBVIRT_PYTHON = """
import sys, time, libvirt
conn = libvirt.open(sys.argv[1])
dom = conn.lookupByName(sys.argv[2])
names = [d.name() for d in conn.listAllDomains()]
assert sys.argv[2] in names, names
assert dom.isActive(), "not running before destroy"
dom.destroy()
assert not dom.isActive()
dom.create()
deadline = time.time() + 30
while dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING and time.time() < deadline:
    time.sleep(0.2)
assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, dom.state()
dom.destroy()
assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, dom.state()
print("libvirt-python ok", names)
"""


def _libvirt_python(env: LibvirtEnv, name: str) -> None:
    proc = subprocess.run([sys.executable, "-c", LIBVIRT_PYTHON, env.uri, name], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"libvirt-python script failed: {proc.stderr}\n{env.log_tail()}"
    assert "libvirt-python ok" in proc.stdout
