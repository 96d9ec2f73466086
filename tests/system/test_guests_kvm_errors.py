"""Bad input to ``pyvmm run``: missing or corrupt kernels, bad sizes and options.

Every case must end with a non-zero status and exactly one clear error line
naming the problem, never a traceback.  Image headers are untrusted input.
"""

from __future__ import annotations

import struct

import pytest

from conftest import assert_one_error_line, run_pyvmm

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.mark.parametrize("size,sig", [(511, True), (512, False), (65536 + 512, True)])
def test_error_bad_boot_sector_files(guests, tmp_path, size, sig):
    data = bytearray(guests["realmode_hello"].read_bytes()[:510].ljust(size, b"\0"))
    if size >= 512:
        data[510:512] = b"\x55\xaa" if sig else b"\0\0"
    bad = tmp_path / f"boot-{size}.bin"
    bad.write_bytes(bytes(data))
    r = run_pyvmm("--accel", "kvm", "--kernel", bad)
    assert_one_error_line(r, str(bad))


def test_error_missing_kernel(tmp_path):
    missing = tmp_path / "no-such-kernel"
    r = run_pyvmm("--accel", "kvm", "--kernel", missing)
    assert_one_error_line(r, str(missing))


def test_error_corrupt_kernel(tmp_path):
    bad = tmp_path / "garbage.img"
    bad.write_bytes(bytes((i * 37 + 11) & 0xFF for i in range(100_000)))
    r = run_pyvmm("--accel", "kvm", "--kernel", bad)
    assert_one_error_line(r, str(bad))


def test_error_truncated_bzimage(guests, tmp_path):
    cut = tmp_path / "cut.bzImage"
    cut.write_bytes(guests["linux64"].read_bytes()[:0x400])
    r = run_pyvmm("--accel", "kvm", "--kernel", cut)
    assert_one_error_line(r, str(cut))


def _patch(data: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _elf_phdr(data: bytes, field: str, value: int) -> bytes:
    """Patch one field of the first ELF32 program header."""
    phoff = struct.unpack_from("<I", data, 0x1C)[0]
    fields = ["type", "offset", "vaddr", "paddr", "filesz", "memsz", "flags", "align"]
    return _patch(data, "<I", phoff + 4 * fields.index(field), value)


def _aout_field(data: bytes, index: int, value: int) -> bytes:
    """Patch a multiboot a.out-kludge address (0 header, 1 load, 2 load_end, 3 bss_end, 4 entry)."""
    mb = next(off for off in range(0, 8192, 4) if struct.unpack_from("<I", data, off)[0] == 0x1BADB002)
    return _patch(data, "<I", mb + 12 + 4 * index, value)


CORRUPTIONS = {
    "elf-memsz-beyond-ram": ("multiboot_info", lambda d: _elf_phdr(d, "memsz", 0x10000000)),
    "elf-paddr-in-pci-hole": ("multiboot_info", lambda d: _elf_phdr(d, "paddr", 0xFFFFF000)),
    "elf-paddr-wraps-4g": ("multiboot_info", lambda d: _elf_phdr(d, "paddr", 0xFFFFFF00)),
    "elf-offset-past-eof": ("multiboot_info", lambda d: _elf_phdr(d, "offset", 0x100000)),
    "elf-no-phdrs": ("multiboot_info", lambda d: _patch(d, "<H", 0x2C, 0)),
    "elf-phoff-garbage": ("multiboot_info", lambda d: _patch(d, "<I", 0x1C, 0xFFFFFFF0)),
    "aout-load-end-below-load": ("multiboot_aout", lambda d: _aout_field(d, 2, 0x1000)),
    "aout-bss-end-huge": ("multiboot_aout", lambda d: _aout_field(d, 3, 0xF0000000)),
    "aout-header-below-load": ("multiboot_aout", lambda d: _aout_field(d, 0, 0x10)),
    "aout-load-end-past-file": ("multiboot_aout", lambda d: _aout_field(d, 2, 0x900000)),
    "bz-setup-sects-past-eof": ("linux64", lambda d: _patch(d, "<B", 0x1F1, 0xFF)),
    "bz-init-size-huge": ("linux64", lambda d: _patch(d, "<I", 0x260, 0xFFFFF000)),
    "bz-alignment-not-pow2": ("linux64", lambda d: _patch(d, "<I", 0x230, 3)),
    "bz-protocol-too-old": ("linux64", lambda d: _patch(d, "<H", 0x206, 0x0100)),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_error_corrupt_image_headers(guests, tmp_path, case):
    """Image headers are untrusted input: every inconsistency is one error line naming the file."""
    base, corrupt = CORRUPTIONS[case]
    bad = tmp_path / f"{case}.img"
    bad.write_bytes(corrupt(guests[base].read_bytes()))
    r = run_pyvmm("--accel", "kvm", "-m", "64M", "--kernel", bad)
    assert_one_error_line(r, str(bad))


def test_error_missing_initrd(guests, tmp_path):
    r = run_pyvmm("--accel", "kvm", "--kernel", guests["multiboot_info"], "--initrd", tmp_path / "nope")
    assert_one_error_line(r, "nope")


@pytest.mark.parametrize("size", ["lots", "0", "-5M", "12Q"])
def test_error_bad_memory_size(guests, size):
    r = run_pyvmm("--accel", "kvm", f"--memory={size}", "--kernel", guests["realmode_hello"])
    assert_one_error_line(r, size)


def test_error_memory_too_large_for_host(guests):
    """4 PiB cannot be mapped on any x86-64 host (47-bit user address space)."""
    r = run_pyvmm("--accel", "kvm", "-m", "4096T", "--kernel", guests["realmode_hello"])
    assert_one_error_line(r)
    assert "memory" in r.stderr.lower() or "4096t" in r.stderr.lower(), r.describe()


@pytest.mark.parametrize("smp", ["0", "two", "-1", "100000", "255"])
def test_error_bad_smp(guests, smp):
    r = run_pyvmm("--accel", "kvm", f"--smp={smp}", "--kernel", guests["realmode_hello"])
    assert_one_error_line(r)
    assert "smp" in r.stderr.lower() or "cpu" in r.stderr.lower(), r.describe()


def test_error_unknown_device(guests):
    r = run_pyvmm("--accel", "kvm", "--device", "frobnicator,speed=9", "--kernel", guests["realmode_hello"])
    assert_one_error_line(r, "frobnicator")


def test_error_bad_debug_exit_property(guests):
    r = run_pyvmm("--accel", "kvm", "--device", "isa-debug-exit,iobase=banana",
                  "--kernel", guests["realmode_hello"])
    assert_one_error_line(r, "iobase")


def test_error_unknown_cpu_feature(guests):
    r = run_pyvmm("--accel", "kvm", "--cpu", "host,-frobnicate", "--kernel", guests["realmode_hello"])
    assert_one_error_line(r, "frobnicate")


def test_linux64_cmdline_longer_than_cmdline_size_is_refused(guests):
    r = run_pyvmm("--accel", "kvm", "-m", "128M", "--kernel", guests["linux64"], "--append", "z" * 3000)
    assert_one_error_line(r)
    assert "command line" in r.stderr or "cmdline" in r.stderr, r.describe()


@pytest.mark.parametrize("spec", ["file:/nonexistent/dir/out", "unix:/nonexistent/dir/sock,server=on,wait=off"])
def test_error_serial_backend_cannot_open(guests, spec):
    r = run_pyvmm("--accel", "kvm", "--serial", spec, "--kernel", guests["realmode_hello"])
    assert_one_error_line(r, "/nonexistent/dir")


def test_error_boot_sector_with_initrd(guests, initrd_file):
    r = run_pyvmm("--accel", "kvm", "--kernel", guests["realmode_hello"], "--initrd", initrd_file)
    assert_one_error_line(r, "initrd")


@pytest.mark.parametrize("size", ["1M", "100K"])
def test_error_memory_too_small(guests, size):
    r = run_pyvmm("--accel", "kvm", "-m", size, "--kernel", guests["realmode_hello"])
    assert_one_error_line(r)
    assert "memory" in r.stderr.lower(), r.stderr
