"""Format detection, boot sectors, and one-line errors for unusable files."""

from __future__ import annotations

import os

import pytest

from pyvmm.boot import detect_format, load_kernel
from pyvmm.errors import BootImageError
from pyvmm.memory import GuestMemory
from pyvmm.x86 import layout
from support.conftest_boot import make_bzimage, make_elf

MiB = 1 << 20


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def boot_sector(size=512):
    data = bytearray(size)
    data[0:2] = b"\xeb\xfe"  # jmp $
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def test_detect_order():
    assert detect_format(make_bzimage()) == "bzimage"  # also carries 0x55AA at 510
    assert detect_format(make_elf(64, 0x100000, [(0x100000, 0x100000, b"\xf4", 1)])) == "elf"
    assert detect_format(boot_sector()) == "bootsector"
    assert detect_format(boot_sector(64 * 1024)) == "bootsector"
    assert detect_format(boot_sector(64 * 1024 + 512)) == "unknown"
    assert detect_format(b"\x55\xaa" * 100) == "unknown"


def test_boot_sector(tmp_path):
    img = boot_sector(2048)
    path = write(tmp_path, "bs.img", img)
    mem = GuestMemory(MiB)
    r = load_kernel(path, mem)
    assert r.kind == "bootsector" and r.entry == 0x7C00
    assert r.cpu.mode == "real" and r.cpu.cs.selector == 0 and r.cpu.regs["rip"] == 0x7C00
    assert r.cpu.regs["rdx"] & 0xFF == 0x80
    assert mem.read(0x7C00, 2048) == img
    assert mem.read_u16(0x40E) == layout.EBDA_START >> 4


def test_boot_sector_rejects_initrd(tmp_path):
    path = write(tmp_path, "bs.img", boot_sector())
    with pytest.raises(BootImageError, match="initrd"):
        load_kernel(path, GuestMemory(MiB), initrd=path)


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    (b"", "file is empty"),
    (b"garbage" * 100, "unrecognised image format"),
    (b"\x7fELF", "truncated"),
    (b"\x7fELF" + os.urandom(200), "ELF"),
])
def test_bad_kernel_files(tmp_path, content, match):
    path = str(tmp_path / "kernel")
    if content is not None:
        write(tmp_path, "kernel", content)
    with pytest.raises(BootImageError, match=match) as ei:
        load_kernel(path, GuestMemory(16 * MiB))
    msg = str(ei.value)
    assert path in msg and "\n" not in msg


def test_directory_as_kernel(tmp_path):
    with pytest.raises(BootImageError, match="is a directory"):
        load_kernel(str(tmp_path), GuestMemory(16 * MiB))


def test_missing_and_empty_initrd(tmp_path):
    path = write(tmp_path, "bz", make_bzimage())
    with pytest.raises(BootImageError, match=r"^initrd .*nothere: no such file$"):
        load_kernel(path, GuestMemory(64 * MiB), initrd=str(tmp_path / "nothere"))
    empty = write(tmp_path, "empty", b"")
    with pytest.raises(BootImageError, match="initrd .* empty"):
        load_kernel(path, GuestMemory(64 * MiB), initrd=empty)


def test_random_garbage_never_crashes(tmp_path):
    """Hostile input only ever produces BootImageError (or a successful, validated load)."""
    import random

    rng = random.Random(1234)
    seeds = [make_bzimage(), make_elf(64, 0x1000000, [(0x1000000, 0x1000000, b"\xf4" * 64, 4096)]),
             make_elf(32, 0x100000, [(0x100000, 0x100000, b"\x02\xb0\xad\x1b" + bytes(60), 64)])]
    mem = GuestMemory(64 * MiB)
    for i in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(1, len(data))]
        path = write(tmp_path, f"g{i}", bytes(data))
        try:
            load_kernel(path, mem)
        except BootImageError as e:
            assert "\n" not in str(e)
