"""Obtain a stock Linux kernel (bzImage plus its module tree) for the default guest.

Preferred source: Debian's cloud kernel, which is small, has the virtio
drivers and boots quickly.  We follow the meta-package
``linux-image-cloud-amd64`` to the concrete ``linux-image-<abi>-cloud-amd64``
that apt currently offers, download it with ``apt-get download`` (no root
needed) and unpack ``/boot/vmlinuz-*`` and ``/lib/modules/<release>/`` in pure
Python.  The result is cached under ``<cache>/kernels/<package>_<version>/``
and a small ``selected.json`` remembers which one to use, so later runs need
neither apt nor the network.  Without apt we fall back to the host's own
``/boot/vmlinuz-*`` (when readable) and ``/lib/modules``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pyvmm.guestkit import apt
from pyvmm.guestkit.cache import (
    atomic_output_dir,
    atomic_write_bytes,
    cache_lock,
    cache_subdir,
    remove_stale_temporaries,
)
from pyvmm.guestkit.deb import extract_deb
from pyvmm.guestkit.errors import GuestKitError

log = logging.getLogger(__name__)

META_PACKAGE = "linux-image-cloud-amd64"
CONCRETE_PATTERN = r"linux-image-.+-cloud-amd64(-unsigned)?"
SELECTED_FILE = "selected.json"
BZIMAGE_MAGIC_OFFSET = 0x202
HOST_BOOT_DIR = Path("/boot")
HOST_MODULES_DIR = Path("/lib/modules")


@dataclass(frozen=True)
class KernelInfo:
    """A kernel ready to boot.

    ``modules_dir`` is the ``lib/modules/<release>`` tree (None if the kernel
    came without one); ``source`` is ``"apt"`` or ``"host"``.
    """

    vmlinuz: Path
    release: str
    modules_dir: Path | None
    package: str
    version: str
    source: str

    @property
    def cache_key(self) -> str:
        """Identifies this exact kernel build (for keying images built from it)."""
        return f"{self.source}:{self.package}:{self.version}:{self.release}"


def check_bzimage(path: Path) -> None:
    """Reject files that are not x86 bzImages (setup header magic "HdrS" at 0x202)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(BZIMAGE_MAGIC_OFFSET)
            magic = fh.read(4)
    except OSError as exc:
        raise GuestKitError(f"cannot read kernel {path}: {exc.strerror}") from exc
    if magic != b"HdrS":
        raise GuestKitError(f"{path} is not an x86 bzImage kernel")


def _kernels_dir() -> Path:
    return cache_subdir("kernels")


def _load_cached(entry: Path) -> KernelInfo | None:
    meta_path = entry / "kernel.json"
    try:
        meta = json.loads(meta_path.read_text())
        modules = entry / "modules"
        info = KernelInfo(
            vmlinuz=entry / "vmlinuz",
            release=str(meta["release"]),
            modules_dir=modules if modules.is_dir() else None,
            package=str(meta["package"]),
            version=str(meta["version"]),
            source="apt",
        )
    except (OSError, ValueError, KeyError):
        return None
    return info if info.vmlinuz.is_file() else None


def _selected() -> KernelInfo | None:
    try:
        name = json.loads((_kernels_dir() / SELECTED_FILE).read_text())["entry"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        return None
    return _load_cached(_kernels_dir() / name)


def _select(entry: Path) -> None:
    atomic_write_bytes(_kernels_dir() / SELECTED_FILE, json.dumps({"entry": entry.name}).encode())


def _unpack_kernel_deb(deb: Path, package: str, version: str, dest: Path) -> KernelInfo:
    """Unpack into ``dest`` laid out as ``vmlinuz``, ``modules/``, ``kernel.json``."""

    def wanted(path: str) -> bool:
        return bool(re.fullmatch(r"boot/vmlinuz-[^/]+", path)) or bool(re.match(r"(usr/)?lib/modules/[^/]+/", path))

    raw = dest / "raw"
    extract_deb(deb, raw, wanted, label=f"extracting {deb.name}")
    images = sorted((raw / "boot").glob("vmlinuz-*"))
    if not images:
        raise GuestKitError(f"{deb.name} contains no /boot/vmlinuz-*")
    image = images[-1]
    release = image.name[len("vmlinuz-") :]
    check_bzimage(image)
    os.replace(image, dest / "vmlinuz")
    for candidate in (raw / "lib" / "modules" / release, raw / "usr" / "lib" / "modules" / release):
        if candidate.is_dir():
            os.replace(candidate, dest / "modules")
            break
    else:
        log.warning("%s has no module tree for %s", deb.name, release)
    shutil.rmtree(raw)
    meta = {"package": package, "version": version, "release": release}
    (dest / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    return KernelInfo(
        vmlinuz=dest / "vmlinuz",
        release=release,
        modules_dir=dest / "modules" if (dest / "modules").is_dir() else None,
        package=package,
        version=version,
        source="apt",
    )


def fetch_apt_kernel(meta_package: str = META_PACKAGE) -> KernelInfo:
    """Download (if not cached) the kernel apt currently offers for ``meta_package``."""
    apt.ensure_candidate(meta_package)
    package = apt.dependency_matching(meta_package, CONCRETE_PATTERN) or meta_package
    version = apt.ensure_candidate(package)
    entry = _kernels_dir() / f"{package}_{version}"
    cached = _load_cached(entry)
    if cached is not None:
        log.info("kernel %s %s already cached", package, version)
        _select(entry)
        return cached
    with tempfile.TemporaryDirectory(prefix=".download.", suffix=".tmp", dir=_kernels_dir()) as dl:
        deb = apt.download(package, version, Path(dl))
        with atomic_output_dir(entry) as tmp:
            _unpack_kernel_deb(deb, package, version, tmp)
    info = _load_cached(entry)
    if info is None:
        raise GuestKitError(f"kernel cache entry {entry} is unusable after unpacking")
    _select(entry)
    return info


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", release))


def host_kernel() -> KernelInfo:
    """The host's own kernel from /boot (the running one preferred)."""
    boot = HOST_BOOT_DIR
    images = [p for p in boot.glob("vmlinuz-*") if p.is_file() and os.access(p, os.R_OK)]
    if not images:
        raise GuestKitError(f"no readable {boot}/vmlinuz-* on this host")
    running = platform.release()
    images.sort(key=lambda p: (p.name == f"vmlinuz-{running}", _release_key(p.name)))
    image = images[-1]
    check_bzimage(image)
    release = image.name[len("vmlinuz-") :]
    modules = HOST_MODULES_DIR / release
    return KernelInfo(
        vmlinuz=image,
        release=release,
        modules_dir=modules if modules.is_dir() else None,
        package="host",
        version=release,
        source="host",
    )


def obtain_kernel(refresh: bool = False, meta_package: str = META_PACKAGE) -> KernelInfo:
    """Return a bootable kernel, downloading it on first use.

    Without ``refresh`` a previously selected cached kernel is used as is (no
    apt, no network).  With ``refresh`` apt is asked for its current version.
    Falls back to the host kernel when apt is missing or fails.
    """
    with cache_lock("kernel"):
        remove_stale_temporaries(_kernels_dir())
        if not refresh:
            cached = _selected()
            if cached is not None:
                return cached
        if apt.apt_available():
            try:
                return fetch_apt_kernel(meta_package)
            except GuestKitError as exc:
                apt_error: GuestKitError | None = exc
        else:
            apt_error = None
        try:
            info = host_kernel()
        except GuestKitError as host_exc:
            if apt_error is not None:
                raise apt_error from None
            raise GuestKitError(f"no kernel: apt is not available and {host_exc}") from None
        if apt_error is not None:
            log.warning("apt kernel unavailable (%s); using host kernel %s", apt_error, info.vmlinuz)
        return info


def describe(info: KernelInfo) -> dict[str, str | None]:
    """JSON-friendly view (for ``python -m pyvmm.guestkit --json``)."""
    d = asdict(info)
    return {k: (str(v) if v is not None else None) for k, v in d.items()}
