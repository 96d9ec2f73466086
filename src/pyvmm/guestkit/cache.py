"""The on-disk cache for downloaded kernels, busybox and built initramfs images.

Everything lives under ``$XDG_CACHE_HOME/pyvmm`` (or ``~/.cache/pyvmm``).  Files
and directories are first written under a temporary name in the same directory
and then renamed into place, so an interrupted download or build never leaves a
half-written entry that a later run would trust.  A lock file serialises
concurrent preparers (parallel test runs, several VMs started at once) so the
same package is not fetched twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pyvmm.guestkit.errors import GuestKitError

CACHE_ENV = "PYVMM_CACHE_DIR"


def cache_root() -> Path:
    """Return (and create) the pyvmm cache directory.

    ``PYVMM_CACHE_DIR`` overrides the XDG location; tests use it to stay hermetic.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        root = Path(override)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "pyvmm"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuestKitError(f"cannot create cache directory {root}: {exc.strerror}") from exc
    return root


def cache_subdir(name: str) -> Path:
    """A named sub-directory of the cache, created on demand."""
    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str = "prepare") -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<cache>/<name>.lock`` for the block."""
    lock_path = cache_root() / f"{name}.lock"
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output_file(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_output_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; rename it to ``path`` if the block succeeds.

    If ``path`` already exists when the block ends (another process won the
    race), the existing one is kept and the new one discarded: both are complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: Path) -> None:
    """Delete leftovers of interrupted runs (``.name.XXXX.tmp``) in ``directory``.

    Only called while holding :func:`cache_lock`, so nobody else is writing them.
    """
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
