"""Guest physical memory.

Guest RAM is one or more host mappings (anonymous, or a file / hugetlbfs for
``--mem-path``) laid out as on a PC: RAM below the 32-bit PCI hole, and the
rest above 4 GiB.  Every host access to guest memory goes through
:class:`GuestMemory`, whose methods check that the whole guest-physical range
lies inside one RAM region.  A guest-supplied address outside RAM raises
:class:`GuestMemoryError`; it never turns into a host read or write elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass

from pyvmm.errors import GuestMemoryError, PyvmmError

FOUR_GIB = 1 << 32
#: x86-64 physical addresses have at most 52 bits.
MAX_GUEST_PHYS = 1 << 52

#: Guest RAM is touched lazily; do not let overcommit accounting refuse a large but sparse guest.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
#: madvise(2) advice that faults every page of a range in, writable (Linux 5.14); -mem-prealloc uses it.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass
class RamRegion:
    """One contiguous block of guest RAM backed by one host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap
    host_addr: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def parse_size(text: str) -> int:
    """Parse a QEMU-style size: ``256M``, ``2G``, ``1024K``, or plain MiB (``512``)."""
    t = text.strip().upper()
    if t.endswith("B") and len(t) > 1 and t[-2] in "KMGT":
        t = t[:-1]
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t) * (1 << 20)  # QEMU's -m default unit is MiB
    except ValueError:
        raise PyvmmError(f"invalid size {text!r}: expected a number with an optional K/M/G/T suffix") from None
    if value != value or value in (float("inf"), float("-inf")):  # nan, inf
        raise PyvmmError(f"invalid size {text!r}: expected a number with an optional K/M/G/T suffix")
    if value <= 0 or value != int(value):
        raise PyvmmError(f"invalid size {text!r}: must be a positive whole number of bytes")
    return int(value)


class GuestMemory:
    """Bounds-checked guest-physical memory.

    ``split=(low_limit, high_base)`` leaves a hole for devices: RAM past ``low_limit``
    continues at ``high_base`` (the platform's address map says where,
    :func:`pyvmm.x86.layout.pc_memory`).  Without it, RAM is one block from 0.
    """

    def __init__(self, size: int, mem_path: str | None = None, *, split: tuple[int, int] | None = None) -> None:
        if size < (1 << 20):
            raise PyvmmError(f"memory size {size} is too small: at least 1 MiB is needed")
        if size % 4096:
            raise PyvmmError(f"memory size {size} is not a multiple of 4 KiB")
        low_limit, high_base = split if split is not None else (size, size)
        if not 0 < low_limit <= high_base:
            raise PyvmmError(f"memory split {low_limit:#x}/{high_base:#x}: the hole must start above 0 "
                             "and end after it")
        if size + (high_base - low_limit) > MAX_GUEST_PHYS:
            raise PyvmmError(f"memory size {size >> 20} MiB is more than an x86 guest can address "
                             f"({MAX_GUEST_PHYS >> 40} TiB of physical address space)")
        self.ram_size = size
        self.mem_path = mem_path
        self._file_offset = 0  # where the next region starts in a --mem-path file
        self.regions: list[RamRegion] = []
        low = min(size, low_limit)
        self._add_region(0, low)
        if size > low:
            self._add_region(high_base, size - low)
        #: RAM below and above the 4 GiB line (CMOS, E820 and the boot loaders need them).
        self.below_4g = sum(max(0, min(r.end, FOUR_GIB) - r.gpa) for r in self.regions)
        self.above_4g = size - self.below_4g

    # -- construction -------------------------------------------------------------------------
    def _add_region(self, gpa: int, size: int) -> None:
        if self.mem_path:
            mapping = self._file_mapping(size)
        else:
            try:
                mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, OverflowError) as e:
                self.close()
                reason = e.strerror if isinstance(e, OSError) else str(e)
                raise PyvmmError(f"cannot allocate {size >> 20} MiB of guest RAM: {reason}") from None
        if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_MERGEABLE") and not self.mem_path:
            try:
                mapping.madvise(mmap.MADV_MERGEABLE)
            except OSError:
                pass
        host_addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        self.regions.append(RamRegion(gpa, size, mapping, host_addr))

    def _file_mapping(self, size: int) -> mmap.mmap:
        assert self.mem_path is not None
        path = self.mem_path
        try:
            if os.path.isdir(path):
                # QEMU semantics: a directory (e.g. a hugetlbfs mount) gets an unlinked temp file.
                fd = os.open(path, os.O_TMPFILE | os.O_RDWR, 0o600)
                offset = 0
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                # One file holds every region, one after the other (low RAM, then high RAM).
                offset = self._file_offset
            try:
                end = offset + size
                if os.fstat(fd).st_size < end:
                    os.ftruncate(fd, end)
                if os.fstat(fd).st_size < end:  # e.g. a /proc or /sys file that ignores ftruncate
                    raise PyvmmError(f"--mem-path {path}: cannot grow the file to {end} bytes")
                # Back every page now, as -mem-prealloc does: a file system without room would
                # otherwise kill the VMM with SIGBUS on the guest's first touch of a missing page.
                try:
                    os.posix_fallocate(fd, offset, size)
                except OSError as e:
                    raise PyvmmError(f"--mem-path {path}: cannot back {size >> 20} MiB of guest RAM: "
                                     f"{e.strerror}") from None
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                    offset=offset)
                self._file_offset = end
                return mapping
            finally:
                os.close(fd)
        except OSError as e:
            self.close()
            raise PyvmmError(f"--mem-path {path}: {e.strerror}") from None
        except (PyvmmError, ValueError, OverflowError) as e:
            self.close()
            if isinstance(e, PyvmmError):
                raise
            raise PyvmmError(f"--mem-path {path}: cannot map {size} bytes: {e}") from None

    def preallocate(self) -> None:
        """Back every page of guest RAM now (QEMU's -mem-prealloc): a host without the memory fails here,
        with one error, rather than when the guest first touches a page.  A --mem-path file is backed
        already (posix_fallocate); as in QEMU its pages are mapped in too.  Pages are populated with
        MADV_POPULATE_WRITE, or one by one on kernels older than 5.14."""
        for r in self.regions:
            if _libc.madvise(ctypes.c_void_p(r.host_addr), ctypes.c_size_t(r.size), _MADV_POPULATE_WRITE) == 0:
                continue
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: the kernel does not know MADV_POPULATE_WRITE
                self.close()
                raise PyvmmError(f"-mem-prealloc: cannot back {r.size >> 20} MiB of guest RAM: "
                                 f"{os.strerror(err)}")
            view = memoryview(r.mapping)
            for off in range(0, r.size, mmap.PAGESIZE):
                view[off] = view[off]  # a write faults the page in (guest RAM is still all zero here)
            view.release()

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mapping.close()
            except BufferError:
                pass  # still exported (e.g. to unicorn); released with the process

    # -- lookup -------------------------------------------------------------------------------
    def region_for(self, gpa: int, length: int = 1) -> RamRegion:
        """The RAM region holding ``[gpa, gpa+length)``; raises if any byte is outside RAM."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.region_for(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def host_address(self, gpa: int, length: int = 1) -> int:
        """Host virtual address of ``gpa`` (checked for ``length`` bytes), for ioctls and preadv."""
        r = self.region_for(gpa, length)
        return r.host_addr + (gpa - r.gpa)

    # -- access -------------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of ``[gpa, gpa+length)``, which must lie in one region."""
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return memoryview(r.mapping)[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return r.mapping[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        r.mapping[off:off + length] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        r = self.region_for(gpa, length)
        ctypes.memset(r.host_addr + (gpa - r.gpa), byte, length)

    def read_u8(self, gpa: int) -> int:
        r = self.region_for(gpa, 1)
        return r.mapping[gpa - r.gpa]

    def read_u16(self, gpa: int) -> int:
        r = self.region_for(gpa, 2)
        return _U16.unpack_from(r.mapping, gpa - r.gpa)[0]

    def read_u32(self, gpa: int) -> int:
        r = self.region_for(gpa, 4)
        return _U32.unpack_from(r.mapping, gpa - r.gpa)[0]

    def read_u64(self, gpa: int) -> int:
        r = self.region_for(gpa, 8)
        return _U64.unpack_from(r.mapping, gpa - r.gpa)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        r = self.region_for(gpa, 1)
        r.mapping[gpa - r.gpa] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        r = self.region_for(gpa, 2)
        _U16.pack_into(r.mapping, gpa - r.gpa, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        r = self.region_for(gpa, 4)
        _U32.pack_into(r.mapping, gpa - r.gpa, value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        r = self.region_for(gpa, 8)
        _U64.pack_into(r.mapping, gpa - r.gpa, value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_cstring(self, gpa: int, max_len: int = 4096) -> bytes:
        """A NUL-terminated string, read at most ``max_len`` bytes and never past the region."""
        r = self.region_for(gpa, 1)
        off = gpa - r.gpa
        end = min(off + max_len, r.size)
        data = r.mapping[off:end]
        nul = data.find(b"\0")
        return data if nul < 0 else data[:nul]
