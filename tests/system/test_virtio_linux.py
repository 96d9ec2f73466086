"""Guest-level acceptance: the stock Debian kernel (guest kit) on tcg uses our virtio-mmio devices.

One boot exercises: a host-made ext4 image (mount, verify a host-written file, write a
new one), a qcow2 overlay on a read-only raw backing file (mke2fs + mount + write +
checksum in the guest, an 8 MiB file deleted and fstrim, then ``qemu-img check`` and
``qemu-img map`` on the host: the trimmed clusters are freed), a ``readonly=on`` drive
(the kernel sees it read-only and writes fail), and virtio-console output.  A second
boot runs the guest with ``console=hvc0`` and virtio-rng.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import run_pyvmm

pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} is missing (e2fsprogs / qemu-utils)"
    return exe


def _guest(script: str, *args, console: str = "ttyS0", timeout: float = 300):
    assert '"' not in script
    quiet = "" if "hvc0" in console else " quiet"
    return run_pyvmm("--accel", "tcg", "-m", "512M", *args,
                     "--append", f'console={console} panic=-1{quiet} pyvmm_run="{script}"', timeout=timeout)


def test_linux_blk_ext4_qcow2_readonly_console(tmp_path):
    payload = os.urandom(300_000)
    host_file = tmp_path / "hostfile"
    host_file.write_bytes(payload)
    ext4 = tmp_path / "ext4.img"
    subprocess.run(["truncate", "-s", "64M", str(ext4)], check=True)
    subprocess.run([_tool("mkfs.ext4"), "-q", "-F", str(ext4)], check=True)
    subprocess.run([_tool("debugfs"), "-w", "-R", f"write {host_file} hostfile", str(ext4)], check=True,
                   capture_output=True)
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(1 << 20) + bytes(31 << 20))
    base_before = hashlib.sha256(base.read_bytes()).hexdigest()
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run([_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    str(overlay), "48M"], check=True)
    ro = tmp_path / "ro.raw"
    ro.write_bytes(b"RO" * (1 << 19))
    hvc = tmp_path / "hvc.out"
    script = ("mount /dev/vda /mnt && sha256sum /mnt/hostfile && dd if=/dev/urandom of=/mnt/new bs=4k count=64 "
              "2>/dev/null && sha256sum /mnt/new && umount /mnt && "
              "mke2fs -q -F /dev/vdb && mount /dev/vdb /mnt && dd if=/dev/urandom of=/mnt/q bs=4k count=200 "
              "2>/dev/null && sync && sha256sum /mnt/q && umount /mnt && mount /dev/vdb /mnt && sha256sum /mnt/q "
              "&& dd if=/dev/urandom of=/mnt/big bs=64k count=128 2>/dev/null && sync && rm /mnt/big && "
              "fstrim -v /mnt && umount /mnt && echo ro=$(cat /sys/block/vdc/ro) && "
              "(dd if=/dev/zero of=/dev/vdc bs=512 count=1 oflag=direct 2>/dev/null && echo rowrite=ok "
              "|| echo rowrite=failed) && echo features=$(cat /sys/bus/virtio/devices/virtio0/features) && "
              "echo hello-from-hvc0 > /dev/hvc0")
    r = _guest(script, "--drive", f"file={ext4},format=raw", "--drive", f"file={overlay},format=qcow2",
               "--drive", f"file={ro},format=raw,readonly=on", "--device", f"virtio-console,chardev=file:{hvc}")
    out = r.serial
    assert "pyvmm-guest: exit status 0" in out, r.describe()
    assert f"{hashlib.sha256(payload).hexdigest()}  /mnt/hostfile" in out, r.describe()
    sums = re.findall(r"^([0-9a-f]{64})  /mnt/q$", out, re.M)
    assert len(sums) == 2 and sums[0] == sums[1], r.describe()
    assert "ro=1" in out and "rowrite=failed" in out, r.describe()
    feats = re.search(r"features=([01]+)", out).group(1)
    assert feats[28] == "1" and feats[29] == "1" and feats[32] == "1", feats  # INDIRECT, EVENT_IDX, VERSION_1
    assert hvc.read_bytes().replace(b"\r", b"") == b"hello-from-hvc0\n"  # tty adds CR (onlcr)
    # host side: the new file is in the ext4 image; the qcow2 is consistent; backing untouched
    new_sum = re.search(r"^([0-9a-f]{64})  /mnt/new$", out, re.M).group(1)
    dumped = tmp_path / "new.out"
    subprocess.run([_tool("debugfs"), "-R", f"dump /new {dumped}", str(ext4)], check=True, capture_output=True)
    assert hashlib.sha256(dumped.read_bytes()).hexdigest() == new_sum
    fsck = subprocess.run([_tool("e2fsck"), "-fn", str(ext4)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    chk = subprocess.run([_tool("qemu-img"), "check", str(overlay)], capture_output=True, text=True)
    assert chk.returncode == 0 and "No errors" in chk.stdout, chk.stdout + chk.stderr
    # the guest's fstrim after deleting an 8 MiB file freed its clusters in the overlay
    assert re.search(r"/mnt: \d+ bytes trimmed", out), r.describe()
    mapped = json.loads(subprocess.run([_tool("qemu-img"), "map", "--output=json", str(overlay)],
                                       capture_output=True, text=True, check=True).stdout)
    in_overlay = sum(e["length"] for e in mapped if e["depth"] == 0 and e["data"])
    assert in_overlay < 6 << 20, f"{in_overlay} bytes still allocated in the overlay after fstrim"
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_before
    assert ro.read_bytes() == b"RO" * (1 << 19)


def test_linux_hvc0_console_and_rng(tmp_path):
    """hvc0 as a kernel console: virtio_console is a module in the guest kit, so printk reaches hvc0
    from the moment it loads; the script's results go through /dev/kmsg to show up there."""
    hvc = tmp_path / "hvc.out"
    script = ("echo rng=$(cat /sys/devices/virtual/misc/hw_random/rng_current) > /dev/kmsg && "
              "echo rngbytes=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c) > /dev/kmsg")
    r = _guest(script, "--device", "virtio-rng", "--device", f"virtio-console,chardev=file:{hvc}",
               console="ttyS0 console=hvc0")
    assert "pyvmm-guest: exit status 0" in r.serial, r.describe()
    out = hvc.read_bytes().decode(errors="replace").replace("\r", "")
    assert "rng=virtio_rng.0" in out and "rngbytes=256" in out, out[-3000:]
