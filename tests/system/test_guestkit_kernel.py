"""Kernel acquisition: apt download + unpack into an isolated cache, selection, fallbacks, errors.

These use the real apt (Debian's package registry) - no mocks.  The isolated
cache (PYVMM_CACHE_DIR) keeps them from touching the user's cache.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pyvmm.guestkit import apt, busybox, kernel
from pyvmm.guestkit.errors import GuestKitError


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYVMM_CACHE_DIR", str(cache))
    return cache


def _need_apt() -> None:
    assert apt.apt_available(), "these tests need apt-get/apt-cache (Debian or Ubuntu host)"


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_check_bzimage(tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"\x7fELF" + b"\0" * 1000)
    with pytest.raises(GuestKitError, match="not an x86 bzImage"):
        kernel.check_bzimage(bogus)
    with pytest.raises(GuestKitError, match="cannot read"):
        kernel.check_bzimage(tmp_path / "missing")


def test_apt_errors_are_one_line(tmp_path: Path) -> None:
    _need_apt()
    assert apt.candidate_version("pyvmm-no-such-package-x") is None
    with pytest.raises(GuestKitError) as info:
        apt.download("pyvmm-no-such-package-x", "1.0", tmp_path)
    assert "pyvmm-no-such-package-x" in str(info.value) and "\n" not in str(info.value)


def test_busybox_static_from_apt(isolated_cache: Path) -> None:
    _need_apt()
    path = busybox._fetch_from_apt()
    assert path.is_relative_to(isolated_cache)
    assert busybox.is_static_x86_64(path)
    assert os.access(path, os.X_OK)
    assert "bin/sh" in busybox.list_applets(path)
    assert not _leftovers(isolated_cache)
    assert busybox._fetch_from_apt() == path  # cached, no second download


@pytest.mark.slow
def test_cloud_kernel_from_apt(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads the current Debian cloud kernel (~27 MB) and unpacks it."""
    _need_apt()
    (isolated_cache / "kernels" / ".interrupted.abc.tmp").mkdir(parents=True)
    info = kernel.obtain_kernel(refresh=True)
    assert info.source == "apt"
    assert info.package.startswith("linux-image-") and info.package.endswith("cloud-amd64")
    assert info.version == apt.candidate_version(info.package)
    kernel.check_bzimage(info.vmlinuz)
    assert info.modules_dir is not None
    assert list(info.modules_dir.rglob("virtio_blk.ko*")), "cloud kernel should ship virtio_blk as a module"
    entry = isolated_cache / "kernels" / f"{info.package}_{info.version}"
    assert info.vmlinuz.parent == entry
    assert json.loads((entry / "kernel.json").read_text())["release"] == info.release
    assert not _leftovers(isolated_cache), "interrupted/temporary entries must be cleaned up"
    assert not list(entry.rglob("*.deb")), "the downloaded .deb is not kept"
    # second call: served from the selection, even with apt out of reach
    empty = isolated_cache / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert not apt.apt_available()
    assert kernel.obtain_kernel() == info


def test_no_apt_no_host_kernel(isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(kernel, "HOST_BOOT_DIR", empty)
    with pytest.raises(GuestKitError, match="no kernel: apt is not available") as info:
        kernel.obtain_kernel()
    assert "\n" not in str(info.value)


def test_host_kernel_fallback(isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-5.10.0-1-amd64").write_bytes(b"\0" * 0x202 + b"HdrS")
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"\0" * 0x202 + b"HdrS")
    mods = tmp_path / "modules"
    (mods / "6.1.0-9-amd64").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(kernel, "HOST_BOOT_DIR", boot)
    monkeypatch.setattr(kernel, "HOST_MODULES_DIR", mods)
    info = kernel.obtain_kernel()
    assert info.source == "host"
    assert info.release == "6.1.0-9-amd64"
    assert info.modules_dir == mods / "6.1.0-9-amd64"


def test_cached_selection_is_used_without_apt(
    isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = isolated_cache / "kernels" / "linux-image-x-cloud-amd64_1.0"
    (entry / "modules").mkdir(parents=True)
    (entry / "vmlinuz").write_bytes(b"\0" * 0x202 + b"HdrS")
    (entry / "kernel.json").write_text(
        json.dumps({"package": "linux-image-x-cloud-amd64", "version": "1.0", "release": "x"})
    )
    (isolated_cache / "kernels" / "selected.json").write_text(json.dumps({"entry": entry.name}))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    info = kernel.obtain_kernel()
    assert (info.vmlinuz, info.release, info.version) == (entry / "vmlinuz", "x", "1.0")
    # a selection pointing outside the cache is ignored
    (isolated_cache / "kernels" / "selected.json").write_text(json.dumps({"entry": "../../etc"}))
    monkeypatch.setattr(kernel, "HOST_BOOT_DIR", empty)
    with pytest.raises(GuestKitError):
        kernel.obtain_kernel()
    assert shutil.which("apt-get") is None
