"""Pieces shared by the boot loaders: the result type, file reading, placement checks.

Every loader parses and validates first and writes guest memory last, so a
corrupt or unfitting image leaves memory untouched and produces one
:class:`BootImageError` line naming the file and the problem.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvmm.cpu_state import CpuState
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from pyvmm.x86.e820 import E820Entry, in_ram

#: Kernel images larger than this are refused before reading (no PC kernel comes close).
MAX_KERNEL_SIZE = 1 << 30


@dataclass
class BootResult:
    """What a boot loader produced: the boot CPU's entry state plus diagnostics.

    ``kind`` is one of ``bzimage``, ``vmlinux``, ``pvh``, ``multiboot``,
    ``bootsector``; ``info`` holds addresses and sizes for logs and tests.
    """

    cpu: CpuState
    kind: str
    entry: int
    info: dict[str, Any] = field(default_factory=dict)


def file_size(path: str, what: str) -> int:
    """Size of a regular file, or a one-line :class:`BootImageError` naming it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BootImageError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise BootImageError(f"{what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BootImageError(f"{what} {path}: is a directory")
    return st.st_size


def read_file(path: str, what: str, limit: int = MAX_KERNEL_SIZE) -> bytes:
    """The whole file; errors for missing, unreadable, empty or oversized files."""
    size = file_size(path, what)
    if size == 0:
        raise BootImageError(f"{what} {path}: file is empty")
    if size > limit:
        raise BootImageError(f"{what} {path}: file is too large ({size} bytes)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BootImageError(f"{what} {path}: {e.strerror}") from None


def load_file_into(memory: GuestMemory, addr: int, path: str, size: int, what: str) -> None:
    """Read ``size`` bytes of ``path`` straight into guest memory at ``addr`` (no copy in Python)."""
    view = memory.view(addr, size)
    try:
        with open(path, "rb") as f:
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise BootImageError(f"{what} {path}: file shrank while loading ({got} of {size} bytes)")
                got += n
    except OSError as e:
        raise BootImageError(f"{what} {path}: {e.strerror}") from None
    finally:
        view.release()


def check_in_ram(e820: Sequence[E820Entry], addr: int, size: int, path: str, what: str) -> None:
    """Error unless ``[addr, addr+size)`` is usable RAM (per the E820 map given to the guest)."""
    if size and not in_ram(e820, addr, size):
        raise BootImageError(f"{what} {path}: {addr:#x}-{addr + size:#x} is not in guest RAM "
                             f"(add memory with -m, or the image asks for an unusable address)")


def check_not_boot_tables(addr: int, size: int, path: str, what: str) -> None:
    """Error if ``[addr, addr+size)`` would overwrite pyvmm's boot tables below ``BOOT_TABLES_END``."""
    if size and addr < layout.BOOT_TABLES_END:
        raise BootImageError(f"{what} {path}: load range {addr:#x}-{addr + size:#x} overlaps the boot "
                             f"tables below {layout.BOOT_TABLES_END:#x}")


def encode_cmdline(cmdline: str, path: str, max_len: int) -> bytes:
    """The command line as NUL-terminated bytes, checked against ``max_len`` (excluding the NUL)."""
    raw = cmdline.encode("utf-8", "surrogateescape")  # argv bytes that are not UTF-8 pass through as typed
    if b"\0" in raw:
        raise BootImageError(f"kernel {path}: command line contains a NUL byte")
    limit = min(max_len, layout.CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        raise BootImageError(f"kernel {path}: command line is {len(raw)} bytes, the kernel accepts at most {limit}")
    return raw + b"\0"
