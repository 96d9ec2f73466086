"""Guest physical memory.

Guest RAM is one or more host mappings (anonymous, or a file / hugetlbfs for
``--mem-path``, or the memory back-end ``-machine memory-backend=ID`` names: a memfd or a
file that another process, a vhost-user back-end, can map too) laid out as on a PC: RAM
below the 32-bit PCI hole, and the rest above 4 GiB.  Every host access to guest memory goes through
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
import threading
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


@dataclass(frozen=True)
class RamBackend:
    """A QEMU memory back-end object (``-object memory-backend-{ram,memfd,file},id=ID,size=...``).

    ``share`` maps it ``MAP_SHARED``: with ``memfd`` or ``file`` another process given the file
    descriptor sees the guest's RAM and the guest sees its writes (vhost-user needs that).
    """

    id: str
    kind: str  # "ram", "memfd" or "file"
    size: int
    share: bool = False
    mem_path: str | None = None  # kind "file": a file, or a directory for an unlinked temporary file
    prealloc: bool = False


@dataclass
class RamRegion:
    """One contiguous block of guest RAM backed by one host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap
    host_addr: int
    #: The file (memfd or mem-path file) the mapping shows, at ``fd_offset``; -1 for anonymous RAM.
    #: Owned by :class:`GuestMemory`.
    fd: int = -1
    fd_offset: int = 0
    shared: bool = False

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

    def __init__(self, size: int, mem_path: str | None = None, *, split: tuple[int, int] | None = None,
                 backend: RamBackend | None = None) -> None:
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
        if backend is not None and backend.size != size:
            raise PyvmmError("Machine memory size does not match the size of the memory backend")
        self.ram_size = size
        self.mem_path = mem_path
        self.backend = backend
        self._file_offset = 0  # where the next region starts in a --mem-path file
        self._backend_fd = -1  # the memfd or file of a memfd/file back-end (every region maps part of it)
        self.regions: list[RamRegion] = []
        if backend is not None and backend.kind in ("memfd", "file"):
            self._backend_fd = self._open_backend(backend, size)
        low = min(size, low_limit)
        self._add_region(0, low)
        if size > low:
            self._add_region(high_base, size - low)
        #: RAM below and above the 4 GiB line (CMOS, E820 and the boot loaders need them).
        self.below_4g = sum(max(0, min(r.end, FOUR_GIB) - r.gpa) for r in self.regions)
        self.above_4g = size - self.below_4g
        #: Pages written by the host (device DMA) while dirty tracking is on, for live migration.
        self.dirty = DirtyPages(self)

    # -- construction -------------------------------------------------------------------------
    def _open_backend(self, backend: RamBackend, size: int) -> int:
        what = f"memory backend '{backend.id}'"
        try:
            if backend.kind == "memfd":
                fd = os.memfd_create(f"pyvmm-ram-{backend.id}", os.MFD_CLOEXEC)
            else:
                path = backend.mem_path or ""
                if os.path.isdir(path):  # QEMU: a directory (hugetlbfs) gets an unlinked file
                    fd = os.open(path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
                else:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise PyvmmError(f"{what}: cannot create its file: {e.strerror}") from None
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            if os.fstat(fd).st_size < size:
                raise PyvmmError(f"{what}: cannot grow {backend.mem_path} to {size} bytes")
            if backend.prealloc:
                os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            raise PyvmmError(f"{what}: cannot back {size >> 20} MiB of guest RAM: {e.strerror}") from None
        except PyvmmError:
            os.close(fd)
            raise
        return fd

    def _backend_mapping(self, size: int) -> mmap.mmap:
        assert self.backend is not None
        flags = mmap.MAP_SHARED if self.backend.share else mmap.MAP_PRIVATE
        try:
            if self._backend_fd < 0:  # memory-backend-ram
                return mmap.mmap(-1, size, flags=flags | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
            return mmap.mmap(self._backend_fd, size, flags=flags | _MAP_NORESERVE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=self._file_offset)
        except (OSError, OverflowError, ValueError) as e:
            self.close()
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise PyvmmError(f"cannot map {size >> 20} MiB of guest RAM from memory backend "
                             f"'{self.backend.id}': {reason}") from None

    def _add_region(self, gpa: int, size: int) -> None:
        fd_offset, fd, shared = 0, -1, False
        if self.backend is not None:
            fd_offset, fd, shared = self._file_offset, self._backend_fd, self.backend.share
            mapping = self._backend_mapping(size)
            self._file_offset += size
        elif self.mem_path:
            mapping = self._file_mapping(size)
        else:
            try:
                mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, OverflowError) as e:
                self.close()
                reason = e.strerror if isinstance(e, OSError) else str(e)
                raise PyvmmError(f"cannot allocate {size >> 20} MiB of guest RAM: {reason}") from None
        if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_MERGEABLE") and not self.mem_path and not shared:
            try:
                mapping.madvise(mmap.MADV_MERGEABLE)
            except OSError:
                pass
        host_addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        self.regions.append(RamRegion(gpa, size, mapping, host_addr, fd, fd_offset, shared))

    @property
    def shareable(self) -> bool:
        """Whether every region is a shared mapping of a file another process can map (vhost-user)."""
        return bool(self.regions) and all(r.fd >= 0 and r.shared for r in self.regions)

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
        if self._backend_fd >= 0:
            os.close(self._backend_fd)
            self._backend_fd = -1

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
        if self.dirty.active:
            self.dirty.mark(gpa, length)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        r = self.region_for(gpa, length)
        ctypes.memset(r.host_addr + (gpa - r.gpa), byte, length)
        if self.dirty.active:
            self.dirty.mark(gpa, length)

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
        if self.dirty.active:
            self.dirty.mark(gpa, 1)

    def write_u16(self, gpa: int, value: int) -> None:
        r = self.region_for(gpa, 2)
        _U16.pack_into(r.mapping, gpa - r.gpa, value & 0xFFFF)
        if self.dirty.active:
            self.dirty.mark(gpa, 2)

    def write_u32(self, gpa: int, value: int) -> None:
        r = self.region_for(gpa, 4)
        _U32.pack_into(r.mapping, gpa - r.gpa, value & 0xFFFF_FFFF)
        if self.dirty.active:
            self.dirty.mark(gpa, 4)

    def write_u64(self, gpa: int, value: int) -> None:
        r = self.region_for(gpa, 8)
        _U64.pack_into(r.mapping, gpa - r.gpa, value & 0xFFFF_FFFF_FFFF_FFFF)
        if self.dirty.active:
            self.dirty.mark(gpa, 8)

    def read_cstring(self, gpa: int, max_len: int = 4096) -> bytes:
        """A NUL-terminated string, read at most ``max_len`` bytes and never past the region."""
        r = self.region_for(gpa, 1)
        off = gpa - r.gpa
        end = min(off + max_len, r.size)
        data = r.mapping[off:end]
        nul = data.find(b"\0")
        return data if nul < 0 else data[:nul]


PAGE_SIZE = 4096


def bitmap_bytes(pages: int) -> int:
    """Bytes of a one-bit-per-page bitmap, rounded up to 64-bit words as KVM_GET_DIRTY_LOG writes it."""
    return (pages + 63) // 64 * 8


def _set_bits(bm: bytearray, first: int, end: int) -> None:
    """Set bits ``[first, end)`` of ``bm`` (LSB first): whole bytes at once, the edges bit by bit."""
    while first < end and first & 7:
        bm[first >> 3] |= 1 << (first & 7)
        first += 1
    whole = (end - first) >> 3
    if whole:
        bm[first >> 3:(first >> 3) + whole] = b"\xff" * whole
        first += whole << 3
    while first < end:
        bm[first >> 3] |= 1 << (first & 7)
        first += 1


class DirtyPages:
    """One bitmap per RAM region of the pages the host (devices) wrote while tracking is on.

    Bit ``i`` (byte ``i // 8``, bit ``i % 8``) stands for page ``i`` of the region, the layout
    of KVM_GET_DIRTY_LOG, so an accelerator ORs its own log into :meth:`take`'s result.  Every
    host write through :class:`GuestMemory`'s write methods is marked; writes through views
    (virtio buffers) are reported by the device's DMA hook
    (:class:`pyvmm.capabilities.DmaObserver`), which the accelerator points at :meth:`mark`.
    A range outside RAM (a guest-chosen address) marks only what lies inside RAM.
    """

    def __init__(self, memory: GuestMemory) -> None:
        self._regions = [(r.gpa, r.size) for r in memory.regions]
        self._lock = threading.Lock()
        self._maps: list[bytearray] | None = None

    @property
    def active(self) -> bool:
        """Tracking is on (GuestMemory's own write methods then mark what they write)."""
        return self._maps is not None

    def start(self) -> None:
        """Begin tracking with every bitmap clear (idempotent: a running log is kept)."""
        with self._lock:
            if self._maps is None:
                self._maps = [bytearray(bitmap_bytes(size // PAGE_SIZE)) for _, size in self._regions]

    def stop(self) -> None:
        with self._lock:
            self._maps = None

    def mark(self, gpa: int, length: int) -> None:
        """Guest RAM ``[gpa, gpa + length)`` was written by the host."""
        if self._maps is None or length <= 0:
            return
        with self._lock:
            maps = self._maps
            if maps is None:
                return
            for (base, size), bm in zip(self._regions, maps, strict=True):
                start, end = max(gpa, base), min(gpa + length, base + size)
                if start >= end:
                    continue
                _set_bits(bm, (start - base) // PAGE_SIZE, (end - 1 - base) // PAGE_SIZE + 1)

    def take(self, region: int) -> bytearray:
        """Region ``region``'s bitmap since the last take (all clear when not tracking); clears it."""
        if not 0 <= region < len(self._regions):
            raise GuestMemoryError(f"no RAM region {region}")
        fresh = bytearray(bitmap_bytes(self._regions[region][1] // PAGE_SIZE))
        with self._lock:
            if self._maps is None:
                return fresh
            taken, self._maps[region] = self._maps[region], fresh
        return taken
