"""Initramfs contents (busybox, applets, device nodes, modules, /init) and the GuestImages API."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from test_guestkit_modules import make_module

from pyvmm.guestkit import DEFAULT_CMDLINE, GuestImages
from pyvmm.guestkit.busybox import find_busybox, is_static_x86_64
from pyvmm.guestkit.cpio import read_newc
from pyvmm.guestkit.errors import GuestKitError
from pyvmm.guestkit.initramfs import READY_MARKER, build_initramfs
from pyvmm.guestkit.kernel import KernelInfo

RELEASE = "9.9.9-test"


@pytest.fixture(scope="module")
def fake_kernel(tmp_path_factory: pytest.TempPathFactory) -> KernelInfo:
    base = tmp_path_factory.mktemp("kernel")
    root = base / "modules"
    make_module(root / "kernel/drivers/virtio/virtio_ring.ko", "virtio_ring", [])
    make_module(root / "kernel/drivers/virtio/virtio.ko.xz", "virtio", ["virtio_ring"])
    make_module(root / "kernel/drivers/block/virtio_blk.ko", "virtio_blk", ["virtio", "virtio_ring"])
    make_module(root / "kernel/drivers/char/hw_random/virtio-rng.ko", "virtio_rng", ["virtio", "rng_core"])
    (root / "modules.builtin").write_text("kernel/drivers/char/hw_random/rng-core.ko\n")
    (base / "vmlinuz").write_bytes(b"\0" * 0x202 + b"HdrS")
    return KernelInfo(
        vmlinuz=base / "vmlinuz",
        release=RELEASE,
        modules_dir=root,
        package="fake",
        version="1",
        source="apt",
    )


def _entries(path: Path) -> dict:
    return {e.name: e for e in read_newc(path.read_bytes())}


def test_host_busybox_is_static() -> None:
    bb = find_busybox()
    assert is_static_x86_64(bb.path)
    assert "bin/sh" in bb.applets and "sbin/insmod" in bb.applets and "bin/cttyhack" in bb.applets
    assert not is_static_x86_64(Path(shutil.which("python3") or "/usr/bin/python3"))


def test_image_contents(fake_kernel: KernelInfo, tmp_path: Path) -> None:
    out = tmp_path / "initrd.cpio"
    info = build_initramfs(fake_kernel, ["virtio_blk", "virtio_rng", "virtio_net"], out)
    assert info.modules == ("virtio_ring", "virtio", "virtio_blk", "virtio_rng")
    assert info.missing == ("virtio_net",)
    assert info.builtin == ("rng_core",)
    e = _entries(out)
    assert stat.S_ISCHR(e["dev/console"].mode) and (e["dev/console"].rdevmajor, e["dev/console"].rdevminor) == (5, 1)
    assert stat.S_ISCHR(e["dev/null"].mode) and (e["dev/null"].rdevmajor, e["dev/null"].rdevminor) == (1, 3)
    assert e["bin/busybox"].data[:4] == b"\x7fELF" and stat.S_IMODE(e["bin/busybox"].mode) == 0o755
    assert stat.S_ISLNK(e["bin/sh"].mode) and e["bin/sh"].data == b"/bin/busybox"
    assert stat.S_ISLNK(e["sbin/insmod"].mode)
    init = e["init"]
    assert stat.S_IMODE(init.mode) == 0o755 and init.data.startswith(b"#!/bin/sh\n")
    moddir = f"lib/modules/{RELEASE}"
    # the .xz module is stored decompressed, under its plain .ko name
    assert e[f"{moddir}/kernel/drivers/virtio/virtio.ko"].data[:4] == b"\x7fELF"
    assert f"{moddir}/kernel/drivers/virtio/virtio.ko.xz" not in e
    text = init.data.decode()
    loads = [ln.split()[1] for ln in text.splitlines() if ln.startswith("insmod ")]
    assert loads == [
        f"/{moddir}/kernel/drivers/virtio/virtio_ring.ko",
        f"/{moddir}/kernel/drivers/virtio/virtio.ko",
        f"/{moddir}/kernel/drivers/block/virtio_blk.ko",
        f"/{moddir}/kernel/drivers/char/hw_random/virtio-rng.ko",
    ]
    for needed in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "mount -t tmpfs tmpfs /tmp"):
        assert needed in text
    assert "cttyhack" in text and READY_MARKER in text and "hostname pyvmm" in text
    dep = e[f"{moddir}/modules.dep"].data.decode().splitlines()
    assert (
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko"
        in dep
    )


def test_init_script_parses_with_busybox_sh(fake_kernel: KernelInfo, tmp_path: Path) -> None:
    out = tmp_path / "initrd.cpio"
    build_initramfs(fake_kernel, ["virtio_blk"], out)
    script = tmp_path / "init"
    script.write_bytes(_entries(out)["init"].data)
    bb = find_busybox()
    proc = subprocess.run([str(bb.path), "sh", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gzip_and_required_modules(fake_kernel: KernelInfo, tmp_path: Path) -> None:
    out = tmp_path / "initrd.cpio.gz"
    build_initramfs(fake_kernel, [], out, compress=True)
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert "init" in _entries(out)
    with pytest.raises(GuestKitError, match="lacks modules: nope"):
        build_initramfs(fake_kernel, ["nope"], tmp_path / "x.cpio", require_modules=True)
    assert not (tmp_path / "x.cpio").exists()


def test_cmdline_editing() -> None:
    g = GuestImages(kernel=Path("k"), initrd=Path("i"), cmdline=" ".join(DEFAULT_CMDLINE))
    assert g.cmdline == "console=ttyS0 panic=-1"
    g2 = g.with_cmdline("tsc_early_khz=2000000", "quiet")
    assert g2.cmdline == "console=ttyS0 panic=-1 tsc_early_khz=2000000 quiet"
    assert g2.with_cmdline("panic=5 quiet").cmdline == "console=ttyS0 tsc_early_khz=2000000 quiet panic=5"
    assert g.cmdline == "console=ttyS0 panic=-1"  # frozen, copies


def test_cmdline_quoting_and_repeatable_console() -> None:
    g = GuestImages(kernel=Path("k"), initrd=Path("i"), cmdline="console=ttyS0 panic=-1")
    g2 = g.with_cmdline('pyvmm_run="uname -a"', "console=tty0")
    assert g2.cmdline == 'console=ttyS0 panic=-1 pyvmm_run="uname -a" console=tty0'
    assert g2.with_cmdline('pyvmm_run="true"').cmdline.count("pyvmm_run") == 1
