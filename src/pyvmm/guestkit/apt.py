"""Thin wrappers around apt-cache / apt-get for fetching Debian packages.

apt does the hard parts (mirrors, signatures, proxies); we only ask it which
version it would install and to download the ``.deb`` into a directory of ours
(``apt-get download`` needs no root).  Output is parsed with ``LC_ALL=C``.
When the package lists are empty, root runs ``apt-get update`` once;
anyone else is told to.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

from pyvmm.guestkit.errors import GuestKitError

log = logging.getLogger(__name__)


def _env() -> dict[str, str]:
    """Our environment with apt's messages in plain C locale, so they parse."""
    return {**os.environ, "LC_ALL": "C", "LANG": "C", "DEBIAN_FRONTEND": "noninteractive"}


def apt_available() -> bool:
    """True if this host has apt (Debian, Ubuntu and derivatives)."""
    return shutil.which("apt-get") is not None and shutil.which("apt-cache") is not None


def _is_root() -> bool:
    return os.geteuid() == 0


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise GuestKitError(f"{args[0]} not found; apt is needed to fetch guest packages") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestKitError(f"'{' '.join(args)}' timed out after {timeout:.0f} s") from exc


def _first_error(stderr: str) -> str:
    """apt prints its real complaint on lines starting with ``E:``."""
    for line in stderr.splitlines():
        if line.startswith("E:"):
            return line[2:].strip()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


def candidate_version(package: str) -> str | None:
    """The version ``apt-get install`` would pick, or None if apt offers none."""
    proc = _run(["apt-cache", "policy", package])
    match = re.search(r"^\s*Candidate:\s*(\S+)", proc.stdout, re.MULTILINE)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def package_size(package: str, version: str) -> int | None:
    """Download size in bytes from the package index (for progress), if known."""
    proc = _run(["apt-cache", "show", "--no-all-versions", f"{package}={version}"])
    match = re.search(r"^Size:\s*(\d+)", proc.stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


def update_lists() -> None:
    """Run ``apt-get update`` (root only), showing apt's own progress on stderr."""
    if not _is_root():
        raise GuestKitError("apt has no package lists: run 'sudo apt-get update' and try again")
    log.info("running 'apt-get update' (package lists are empty or stale)")
    try:
        proc = subprocess.run(
            ["apt-get", "update"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise GuestKitError("'apt-get update' timed out") from exc
    if proc.returncode != 0:
        raise GuestKitError(f"'apt-get update' failed: {_first_error(proc.stderr)}")


def ensure_candidate(package: str) -> str:
    """Candidate version of ``package``, updating the lists once if apt knows none."""
    version = candidate_version(package)
    if version is None:
        update_lists()
        version = candidate_version(package)
    if version is None:
        raise GuestKitError(f"apt offers no package {package!r} (check /etc/apt/sources.list)")
    return version


def dependency_matching(package: str, pattern: str) -> str | None:
    """First ``Depends:`` of the candidate of ``package`` whose name matches ``pattern``.

    Used to follow a meta-package (``linux-image-cloud-amd64``) to the concrete
    versioned package it currently points at.
    """
    proc = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package])
    rx = re.compile(pattern)
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*\|?(?:Pre)?Depends:\s*(\S+)", line)
        if m and rx.fullmatch(m.group(1)):
            return m.group(1)
    return None


class _DownloadProgress(threading.Thread):
    """Poll the download directory and log percentages while apt fetches."""

    def __init__(self, directory: Path, expected: int | None, label: str) -> None:
        super().__init__(daemon=True, name="apt-progress")
        self._dir = directory
        self._expected = expected
        self._label = label
        self._done = threading.Event()

    def run(self) -> None:
        next_step = 10
        while not self._done.wait(0.5):
            if not self._expected:
                continue
            done = 0
            for root, _dirs, files in os.walk(self._dir):
                for name in files:
                    try:
                        done += os.stat(os.path.join(root, name)).st_size
                    except OSError:
                        pass
            pct = min(100, done * 100 // self._expected)
            if pct >= next_step and pct < 100:
                log.info("%s: %d%%", self._label, pct)
                next_step = (pct // 10 + 1) * 10

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=2)


def download(package: str, version: str, directory: Path) -> Path:
    """``apt-get download package=version`` into ``directory``; returns the .deb path."""
    size = package_size(package, version)
    label = f"downloading {package} {version}"
    log.info("%s (%s)", label, f"{size / 1e6:.1f} MB" if size else "size unknown")
    args = ["apt-get", "download", f"{package}={version}"]
    if _is_root():
        # apt drops to the _apt user for downloads, which cannot write to our
        # cache directory; as root we can simply download as root.
        args[1:1] = ["-o", "APT::Sandbox::User=root"]
    progress = _DownloadProgress(directory, size, label)
    progress.start()
    try:
        proc = subprocess.run(
            args, cwd=directory, capture_output=True, text=True, env=_env(), timeout=1800, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise GuestKitError(f"downloading {package} timed out") from exc
    finally:
        progress.stop()
    if proc.returncode != 0:
        raise GuestKitError(f"cannot download {package} {version}: {_first_error(proc.stderr)}")
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestKitError(f"apt-get download {package} produced no .deb file")
    log.info("%s: done", label)
    return debs[-1]
