"""Build a busybox initramfs that boots straight to a root shell on the console.

Contents: a static busybox with a symlink per applet, a few device nodes the
kernel needs before /init runs (``/dev/console`` above all: without it init has
no stdin/stdout), the requested kernel modules with their dependency closure
(decompressed, plus a ``modules.dep`` so ``modprobe`` works inside the guest),
and a generated ``/init`` shell script.

The archive is uncompressed by default: under an emulated CPU the kernel
spends noticeably longer inflating a gzip initramfs than copying a plain one.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.guestkit.agent import GUEST_AGENT_PATH, SHUTDOWN_SCRIPT, GuestAgent
from pyvmm.guestkit.busybox import Busybox, find_busybox
from pyvmm.guestkit.cpio import CpioWriter, NodeKind, write_archive_file
from pyvmm.guestkit.errors import GuestKitError
from pyvmm.guestkit.kernel import KernelInfo
from pyvmm.guestkit.modules import ModuleTree, strip_compression

log = logging.getLogger(__name__)

# Bumped whenever the image layout or /init changes, so cached images are rebuilt.
FORMAT_VERSION = 5  # bump when the generated /init changes: it is part of the cache key

DEFAULT_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtiofs",  # virtio-fs shares (vhost-user-fs); pulls in fuse
    "button",  # the ACPI power button as an input device (see the power button loop in /init)
    "evdev",
)

DEFAULT_HOSTNAME = "pyvmm"
READY_MARKER = "pyvmm-guest: shell ready"
HVC_READY_MARKER = "pyvmm-guest: shell ready on hvc0"
POWER_BUTTON_MARKER = "pyvmm-guest: power button pressed: powering off"


@dataclass(frozen=True)
class InitramfsInfo:
    """What went into a built image."""

    path: Path
    modules: tuple[str, ...]  # loaded by /init, in this order
    builtin: tuple[str, ...] = field(default=())  # requested but built into the kernel
    missing: tuple[str, ...] = field(default=())  # requested but absent


_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "etc",
    "proc",
    "sys",
    "dev",
    "run",
    "mnt",
    "var",
    "lib",
)

_PROFILE = """\
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export PS1='\\w \\$ '
alias ll='ls -l'
"""


# udev's /dev/virtio-ports/NAME links, for the named ports of a virtio-serial device (their names
# arrive from the host a moment after the driver has loaded, so look for a few seconds).
VIRTIO_PORTS_SNIPPET = """\
if ls /sys/bus/virtio/drivers/virtio_console 2>/dev/null | grep -q virtio; then
    mkdir -p /dev/virtio-ports
    (for i in $(seq 50); do
        for p in /sys/class/virtio-ports/*; do
            n=; { read -r n < "$p/name"; } 2>/dev/null
            [ -n "$n" ] && [ ! -e "/dev/virtio-ports/$n" ] && ln -s "../${p##*/}" "/dev/virtio-ports/$n"
            if [ "$n" = AGENT_PORT ] && [ -x /AGENT_PATH ] && mkdir /run/qemu-ga.started 2>/dev/null; then
                setsid /AGENT_PATH -m virtio-serial -p /dev/virtio-ports/$n -t /run -f /run/qemu-ga.pid \\
                    </dev/null >/run/qemu-ga.log 2>&1 &
            fi
        done
        sleep 0.1
    done) &
fi""".replace("AGENT_PORT", "org.qemu.guest_agent.0").replace("AGENT_PATH", GUEST_AGENT_PATH)

#: The QGA port name: /init starts Debian's qemu-ga on it when the host offers it.
AGENT_PORT = "org.qemu.guest_agent.0"

OS_RELEASE = """\
PRETTY_NAME="pyvmm guest kit (busybox)"
NAME="pyvmm guest kit"
ID=pyvmm-guestkit
"""


def render_init(release: str, module_paths: list[str], hostname: str) -> str:
    """The /init script.  ``module_paths`` are relative to /lib/modules/<release>."""
    loads = "\n".join(
        f"insmod /lib/modules/{release}/{shlex.quote(p)} || echo 'init: failed to load {p}'" for p in module_paths
    )
    return f"""#!/bin/sh
# pyvmm default guest /init (generated; format {FORMAT_VERSION})
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname {shlex.quote(hostname)}
{loads}
{VIRTIO_PORTS_SNIPPET}
# The ACPI power button (QMP system_powerdown, virsh shutdown) powers off cleanly, as acpid would.
for e in /sys/class/input/event*; do
    if grep -qs 'Power Button' "$e/device/name"; then
        (exec 3<"/dev/input/${{e##*/}}"; dd bs=24 count=1 of=/dev/null <&3 2>/dev/null
         echo "{POWER_BUTTON_MARKER}"; sync; poweroff -f) &
    fi
done
read -r up _ < /proc/uptime
echo
echo "pyvmm guest: Linux $(uname -r) on $(uname -m), userspace at ${{up}}s"
cd /root
if [ -n "$pyvmm_run" ]; then
    # pyvmm_run="cmd" on the kernel command line: run it, report, power off.
    sh -c "$pyvmm_run"
    status=$?
    echo "pyvmm-guest: exit status $status"
    # pyvmm's pyvmm-exit-status device (an MMIO byte) makes this the VMM's exit status too.
    [ "$status" != 0 ] && devmem 0xfeb01000 8 "$status" 2>/dev/null
else
    echo "Type 'poweroff -f' (or exit the shell) to stop the machine."
    echo "{READY_MARKER}"
    export PS1='\\w \\$ '
    if [ -c /dev/hvc0 ]; then
        # A virtio console is present: give it a shell of its own too.
        # (cttyhack would pick the kernel console; opening hvc0 in the new session makes it the ctty.)
        setsid sh -c 'exec <>/dev/hvc0 >&0 2>&0; echo "{HVC_READY_MARKER}"; exec sh -l' &
    fi
    setsid cttyhack sh -l
fi
sync
poweroff -f
# Still here: no way to power off (e.g. no ACPI).  Reboot instead; with
# panic=-1 / -no-reboot style settings the VMM treats that as the end.
sleep 1
reboot -f
"""


def _modules_dep_lines(tree: ModuleTree, order: list[str], guest_path: dict[str, str]) -> list[str]:
    """modules.dep entries for the included modules (busybox modprobe reads this)."""
    lines = []
    for name in order:
        closure = tree.resolve([name]).order[:-1]
        deps = " ".join(guest_path[d] for d in reversed(closure) if d in guest_path)
        lines.append(f"{guest_path[name]}:{' ' + deps if deps else ''}")
    return lines


def build_initramfs(
    kernel: KernelInfo,
    modules: list[str] | tuple[str, ...],
    out_path: Path,
    *,
    busybox: Busybox | None = None,
    hostname: str = DEFAULT_HOSTNAME,
    compress: bool = False,
    require_modules: bool = False,
    agent: GuestAgent | None = None,
) -> InitramfsInfo:
    """Write a busybox initramfs for ``kernel`` to ``out_path`` (atomically).

    ``modules`` are loaded at boot together with everything they depend on.  ``agent``
    (Debian's qemu-ga and its libraries) is started when its virtio-serial port appears.
    Modules that are built into the kernel are skipped; absent ones are
    logged and skipped unless ``require_modules`` is set.
    """
    bb = busybox or find_busybox()
    if modules and kernel.modules_dir is None:
        if require_modules:
            raise GuestKitError(f"kernel {kernel.release} has no module tree")
        log.warning("kernel %s has no module tree; building without modules", kernel.release)
        modules = []
    tree = ModuleTree(kernel.modules_dir) if kernel.modules_dir is not None else None
    order: list[str] = []
    builtin: list[str] = []
    missing: list[str] = []
    if tree is not None and modules:
        res = tree.resolve(list(modules))
        order, builtin, missing = res.order, res.builtin, res.missing
    if missing and require_modules:
        raise GuestKitError(f"kernel {kernel.release} lacks modules: {', '.join(missing)}")
    if missing:
        log.info("modules not in kernel %s (skipped): %s", kernel.release, ", ".join(missing))
    if builtin:
        log.info("modules built into kernel %s: %s", kernel.release, ", ".join(builtin))
    log.info("initramfs modules (load order): %s", ", ".join(order) or "none")

    guest_path = {name: strip_compression(tree.relpath(name)) for name in order} if tree else {}
    module_blobs = {name: tree.read(name) for name in order} if tree else {}
    busybox_bytes = bb.path.read_bytes()
    init = render_init(kernel.release, [guest_path[n] for n in order], hostname)
    moddir = f"lib/modules/{kernel.release}"

    def fill(w: CpioWriter) -> None:
        for d in _DIRS:
            w.add_dir(d)
        w.add_dir("root", mode=0o700)
        w.add_dir("tmp", mode=0o1777)
        w.add_device("dev/console", NodeKind.CHAR_DEVICE, 5, 1, mode=0o600)
        w.add_device("dev/null", NodeKind.CHAR_DEVICE, 1, 3, mode=0o666)
        w.add_device("dev/tty", NodeKind.CHAR_DEVICE, 5, 0, mode=0o666)
        w.add_device("dev/ttyS0", NodeKind.CHAR_DEVICE, 4, 64, mode=0o600)
        w.add_file("bin/busybox", busybox_bytes, mode=0o755)
        for applet in bb.applets:
            if applet != "bin/busybox":
                w.add_symlink(applet, "/bin/busybox")
        w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        w.add_file("etc/group", b"root:x:0:\n")
        w.add_file("etc/hostname", f"{hostname}\n".encode())
        w.add_file("etc/profile", _PROFILE.encode())
        w.add_dir(moddir)
        for name in order:
            w.add_file(f"{moddir}/{guest_path[name]}", module_blobs[name])
        if tree is not None:
            dep = "\n".join(_modules_dep_lines(tree, order, guest_path))
            w.add_file(f"{moddir}/modules.dep", (dep + "\n").encode() if dep else b"")
        w.add_file("etc/os-release", OS_RELEASE.encode())
        if agent is not None:
            for guest_file, host_file in agent.files:
                w.add_file(guest_file, host_file.read_bytes(), mode=0o755)
            w.add_file("sbin/shutdown", SHUTDOWN_SCRIPT.encode(), mode=0o755)
        w.add_file("init", init.encode(), mode=0o755)

    write_archive_file(out_path, fill, compress=compress)
    log.info("built initramfs %s (%d bytes)", out_path, out_path.stat().st_size)
    return InitramfsInfo(out_path, tuple(order), tuple(builtin), tuple(missing))
