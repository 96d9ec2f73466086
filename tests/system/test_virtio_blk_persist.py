"""Issue 4's block acceptance: data written by one boot of a stock kernel is read back by the next.

Boot 1 makes a file system on /dev/vda (busybox's mke2fs; the guest kit has no e2fsprogs, and the
kernel's ext4 driver mounts it), writes 64 MiB of random data, records its checksum, syncs and powers
off.  Boot 2 mounts the disk and checksums the data again.  Raw and qcow2 (made by ``qemu-img``) images.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import run_pyvmm

pytestmark = pytest.mark.slow

WRITE = ("mke2fs -q -F /dev/vda && mount -t ext4 /dev/vda /mnt && "
         "dd if=/dev/urandom of=/mnt/data bs=1M count=64 2>/dev/null && sync && "
         "echo written=$(sha256sum /mnt/data | cut -c1-64) && umount /mnt")
READ = "mount -t ext4 /dev/vda /mnt && echo readback=$(sha256sum /mnt/data | cut -c1-64) && umount /mnt"


def _boot(image, fmt: str, script: str) -> str:
    r = run_pyvmm("--accel", "tcg", "-m", "384M", "--drive", f"file={image},format={fmt},if=virtio",
                  "--append", f'console=ttyS0 panic=-1 quiet pyvmm_run="{script}"', timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pyvmm-guest: exit status 0" in r.stdout, r.stdout[-3000:]
    return r.stdout


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_data_survives_a_second_boot(tmp_path, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        subprocess.run(["truncate", "-s", "96M", str(image)], check=True)
    else:
        qemu_img = shutil.which("qemu-img")
        assert qemu_img, "qemu-img is missing (Debian package qemu-utils)"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "96M"], check=True)
    written = re.search(r"written=([0-9a-f]{64})", _boot(image, fmt, WRITE))
    assert written, "the first boot did not report a checksum"
    readback = re.search(r"readback=([0-9a-f]{64})", _boot(image, fmt, READ))
    assert readback, "the second boot did not report a checksum"
    assert readback.group(1) == written.group(1)
    if fmt == "qcow2":
        subprocess.run([shutil.which("qemu-img"), "check", "-q", str(image)], check=True)
