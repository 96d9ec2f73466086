"""Kernel module trees: find modules, read their dependencies, order them for insmod.

busybox ``insmod`` loads exactly one file and knows nothing about
dependencies, so the initramfs loads the closure of the requested modules in
dependency order.  The order comes from ``modules.dep`` when the tree has one
(an installed kernel), otherwise from each module's own ``.modinfo`` ELF
section (``depends=a,b``), which is what ``depmod`` reads too - a kernel
unpacked from its .deb has no ``modules.dep`` because depmod runs at install.

Modules may be stored as ``.ko``, ``.ko.xz``, ``.ko.zst`` or ``.ko.gz``; they
are decompressed on the host so the guest's insmod never needs a codec.
"""

from __future__ import annotations

import gzip
import io
import logging
import lzma
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyvmm.guestkit.errors import GuestKitError

log = logging.getLogger(__name__)

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    """Canonical module name of a file: ``.../virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = os.path.basename(path)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def strip_compression(relpath: str) -> str:
    """``kernel/x/foo.ko.zst`` -> ``kernel/x/foo.ko`` (the name used inside the guest)."""
    for suffix in (".xz", ".zst", ".gz"):
        if relpath.endswith(".ko" + suffix):
            return relpath[: -len(suffix)]
    return relpath


def decompress_module(data: bytes, relpath: str) -> bytes:
    """Return the plain ELF bytes of a possibly compressed module file."""
    try:
        if relpath.endswith(".xz"):
            return lzma.decompress(data)
        if relpath.endswith(".gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise GuestKitError(f"corrupt compressed module {relpath}: {exc}") from exc
    if relpath.endswith(".zst"):
        return _zstd_decompress(data, relpath)
    return data


def _zstd_decompress(data: bytes, relpath: str) -> bytes:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestKitError(
                f"{relpath} is zstd-compressed: install the 'zstandard' Python package or zstd"
            ) from None
        proc = subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise GuestKitError(f"corrupt compressed module {relpath}") from None
        return proc.stdout
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)  # type: ignore[no-any-return]
    except zstandard.ZstdError as exc:
        raise GuestKitError(f"corrupt compressed module {relpath}: {exc}") from exc


def read_modinfo(elf_bytes: bytes, what: str = "module") -> dict[str, list[str]]:
    """Parse the ``.modinfo`` section: NUL-separated ``key=value`` strings."""
    try:
        elf = ELFFile(io.BytesIO(elf_bytes))
        section = elf.get_section_by_name(".modinfo")
    except ELFError as exc:
        raise GuestKitError(f"{what} is not a valid ELF module: {exc}") from exc
    if section is None:
        raise GuestKitError(f"{what} has no .modinfo section")
    info: dict[str, list[str]] = {}
    for raw in section.data().split(b"\0"):
        if b"=" not in raw:
            continue
        key, _, value = raw.decode("utf-8", "replace").partition("=")
        info.setdefault(key, []).append(value)
    return info


@dataclass
class Resolution:
    """Outcome of resolving a module list against a tree."""

    order: list[str] = field(default_factory=list)  # to insmod, dependencies first
    builtin: list[str] = field(default_factory=list)  # requested/needed but built into the kernel
    missing: list[str] = field(default_factory=list)  # requested but neither a module nor built in


class ModuleTree:
    """The ``/lib/modules/<release>`` directory of one kernel."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise GuestKitError(f"kernel module directory {root} does not exist")
        self.root = root
        self._paths: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            # build/ and source/ point into kernel headers; never descend.
            dirnames[:] = [d for d in dirnames if d not in ("build", "source")]
            for fname in filenames:
                if fname.endswith(MODULE_SUFFIXES):
                    rel = os.path.relpath(os.path.join(dirpath, fname), root)
                    self._paths.setdefault(module_name(fname), rel)
        self._builtin = self._read_builtin()
        self._depmap = self._read_modules_dep()
        self._deps_cache: dict[str, list[str]] = {}

    def _read_builtin(self) -> set[str]:
        path = self.root / "modules.builtin"
        if not path.is_file():
            return set()
        return {module_name(line.strip()) for line in path.read_text().splitlines() if line.strip()}

    def _read_modules_dep(self) -> dict[str, list[str]] | None:
        path = self.root / "modules.dep"
        if not path.is_file():
            return None
        depmap: dict[str, list[str]] = {}
        for line in path.read_text().splitlines():
            target, sep, rest = line.partition(":")
            if not sep:
                continue
            depmap[module_name(target)] = [module_name(d) for d in rest.split()]
        return depmap

    # -- queries -------------------------------------------------------------

    def has_module(self, name: str) -> bool:
        return name.replace("-", "_") in self._paths

    def is_builtin(self, name: str) -> bool:
        return name.replace("-", "_") in self._builtin

    def relpath(self, name: str) -> str:
        """Path of the module file relative to the tree root."""
        try:
            return self._paths[name.replace("-", "_")]
        except KeyError:
            raise GuestKitError(f"kernel module {name!r} not found in {self.root}") from None

    def read(self, name: str) -> bytes:
        """The module's plain (decompressed) ELF bytes."""
        rel = self.relpath(name)
        try:
            data = (self.root / rel).read_bytes()
        except OSError as exc:
            raise GuestKitError(f"cannot read module {rel}: {exc.strerror}") from exc
        return decompress_module(data, rel)

    def direct_dependencies(self, name: str) -> list[str]:
        """Modules ``name`` needs loaded first (not transitive)."""
        name = name.replace("-", "_")
        if name in self._deps_cache:
            return self._deps_cache[name]
        if self._depmap is not None and name in self._depmap:
            # modules.dep lists the full transitive set; the closure walk is
            # idempotent, so using it as "direct" deps is still correct.
            deps = list(self._depmap[name])
        else:
            info = read_modinfo(self.read(name), self.relpath(name))
            deps = [d.replace("-", "_") for v in info.get("depends", []) for d in v.split(",") if d]
        self._deps_cache[name] = deps
        return deps

    def resolve(self, requested: list[str]) -> Resolution:
        """Dependency closure of ``requested`` in load order (post-order DFS)."""
        result = Resolution()
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str, chain: tuple[str, ...], explicit: bool) -> None:
            if name in done:
                return
            if not self.has_module(name):
                done.add(name)
                if self.is_builtin(name):
                    result.builtin.append(name)
                elif explicit:
                    result.missing.append(name)
                else:
                    raise GuestKitError(f"module {chain[-1]} needs {name}, which is not in {self.root}")
                return
            if name in visiting:
                raise GuestKitError(f"module dependency cycle: {' -> '.join((*chain, name))}")
            visiting.add(name)
            for dep in self.direct_dependencies(name):
                visit(dep, (*chain, name), explicit=False)
            visiting.discard(name)
            done.add(name)
            result.order.append(name)

        for req in requested:
            visit(req.replace("-", "_"), (), explicit=True)
        return result
