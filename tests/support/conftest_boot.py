"""Helpers for the boot-loader tests: synthetic kernel images and the real Debian kernel.

The synthetic images are built with ``struct`` at the offsets given in the
specifications (not with pyvmm's own ctypes structures), so a layout mistake
in pyvmm shows up as a test failure instead of cancelling out.
"""

from __future__ import annotations

import glob
import io
import lzma
import os
import struct
import subprocess
import tarfile
from pathlib import Path

# --- ELF -------------------------------------------------------------------------------------
PT_LOAD = 1
PT_NOTE = 4
EM_386 = 3
EM_X86_64 = 62


def elf_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(bits: int, entry: int, segments: list[tuple[int, int, bytes, int]], *,
             notes: bytes = b"", machine: int | None = None, etype: int = 2) -> bytes:
    """An ELF executable: ``segments`` are ``(paddr, vaddr, data, memsz)``; ``notes`` go in a PT_NOTE."""
    if machine is None:
        machine = EM_X86_64 if bits == 64 else EM_386
    ehsize, phsize = (64, 56) if bits == 64 else (52, 32)
    nph = len(segments) + (1 if notes else 0)
    off = ehsize + phsize * nph
    off = (off + 15) & ~15
    blobs: list[tuple[int, bytes]] = []
    phdrs = b""
    for paddr, vaddr, data, memsz in segments:
        if bits == 64:
            phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 7, off, vaddr, paddr, len(data), memsz, 16)
        else:
            phdrs += struct.pack("<IIIIIIII", PT_LOAD, off, vaddr, paddr, len(data), memsz, 7, 16)
        blobs.append((off, data))
        off = (off + len(data) + 15) & ~15
    if notes:
        if bits == 64:
            phdrs += struct.pack("<IIQQQQQQ", PT_NOTE, 4, off, 0, 0, len(notes), len(notes), 4)
        else:
            phdrs += struct.pack("<IIIIIIII", PT_NOTE, off, 0, 0, len(notes), len(notes), 4, 4)
        blobs.append((off, notes))
        off += len(notes)
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1, 0]) + bytes(8)
    if bits == 64:
        ehdr = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, ehsize, 0, 0, ehsize, phsize,
                                   nph, 64, 0, 0)
    else:
        ehdr = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, ehsize, 0, 0, ehsize, phsize,
                                   nph, 40, 0, 0)
    out = bytearray(off)
    out[:len(ehdr)] = ehdr
    out[ehsize:ehsize + len(phdrs)] = phdrs
    for o, data in blobs:
        out[o:o + len(data)] = data
    return bytes(out)


# --- multiboot -------------------------------------------------------------------------------
MB_MAGIC = 0x1BADB002


def multiboot_header(flags: int, addrs: tuple[int, int, int, int, int] | None = None,
                     checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = (-(MB_MAGIC + flags)) & 0xFFFFFFFF
    hdr = struct.pack("<III", MB_MAGIC, flags, checksum)
    if addrs is not None:
        hdr += struct.pack("<5I", *addrs)
    return hdr


# --- bzImage ---------------------------------------------------------------------------------
def make_bzimage(kernel: bytes = b"\x90" * 4096, *, version: int = 0x020F, setup_sects: int = 4,
                 xloadflags: int = 0x3, relocatable: int = 1, pref_address: int = 0x1000000,
                 init_size: int = 0x400000, kernel_alignment: int = 0x200000,
                 initrd_addr_max: int = 0x7FFFFFFF, cmdline_size: int = 2047, loadflags: int = 0x1,
                 magic: bytes = b"HdrS") -> bytes:
    """A bzImage-shaped file: boot sector + setup sectors carrying the header, then ``kernel``."""
    kernel = kernel + bytes(-len(kernel) % 16)  # the kernel build pads to whole paragraphs
    setup = bytearray((setup_sects + 1) * 512)
    hdr_end = 0x26C
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(kernel) + 15) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FA, 0xFFFF)  # vid_mode
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB  # jmp short past the header
    setup[0x201] = hdr_end - 0x202
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + kernel


# --- the real Debian kernel --------------------------------------------------------------------
def _cache_root() -> Path:
    override = os.environ.get("PYVMM_CACHE_DIR")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyvmm"


def _extract_vmlinuz(deb: Path, dest_dir: Path) -> Path:
    """Pull ``boot/vmlinuz-*`` out of a .deb (ar archive holding data.tar.xz) in pure Python."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb} is not an ar archive")
    off = 8
    while off + 60 <= len(data):
        name = data[off:off + 16].decode().strip().rstrip("/")
        size = int(data[off + 48:off + 58].decode().strip())
        body = data[off + 60:off + 60 + size]
        off += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        raw = lzma.decompress(body) if name.endswith(".xz") else body
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and base.startswith("vmlinuz-"):
                    f = tar.extractfile(member)
                    assert f is not None
                    out = dest_dir / base
                    tmp = out.with_suffix(".tmp")
                    tmp.write_bytes(f.read())
                    tmp.rename(out)
                    return out
    raise RuntimeError(f"{deb} has no boot/vmlinuz-*")


def debian_kernel() -> Path:
    """Path of a Debian cloud-amd64 bzImage: from the pyvmm cache, else fetched with apt-get download."""
    root = _cache_root()
    # guestkit's cache (kernels/<package>_<version>/vmlinuz) or this helper's own (boot-tests/).
    found = sorted(glob.glob(str(root / "kernels" / "linux-image-*-cloud-amd64*" / "vmlinuz"))
                   + glob.glob(str(root / "boot-tests" / "vmlinuz-*-cloud-amd64")))
    for candidate in reversed(found):
        with open(candidate, "rb") as f:
            if f.read(0x206)[0x202:] == b"HdrS":
                return Path(candidate)
    dest = root / "boot-tests"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["apt-cache", "search", "--names-only", r"^linux-image-[0-9.]+-[0-9]+-cloud-amd64$"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        names = sorted(line.split()[0] for line in out.splitlines() if line.strip())
        if not names:
            raise RuntimeError("apt-cache knows no linux-image-*-cloud-amd64 package (run apt-get update)")
        subprocess.run(["apt-get", "download", names[-1]], cwd=dest, capture_output=True, timeout=600,
                       check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot fetch a Debian cloud kernel with apt: {e}") from e
    debs = sorted(dest.glob("linux-image-*.deb"))
    if not debs:
        raise RuntimeError("apt-get download produced no .deb")
    path = _extract_vmlinuz(debs[-1], dest)
    debs[-1].unlink()
    return path
