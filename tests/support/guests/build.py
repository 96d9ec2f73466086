"""Build the purpose-built test guests with the system gcc/binutils.

The guests are tiny freestanding programs (GNU as + a little C) that exercise
one VMM feature each and report through the UART and isa-debug-exit.  They are
built at test time into a scratch directory, so the repository holds sources
only.  A missing toolchain raises :class:`ToolchainError`: the tests treat it
as a failure, never a skip.

Usage: ``python tests/support/guests/build.py OUTDIR [NAME...]``.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SRC = Path(__file__).resolve().parent
LD_DIR = SRC / "ld"

TOOLS = ("gcc", "ld", "objcopy", "readelf")

#: Flags shared by every C guest: no libc, no SSE/x87 (the KVM instruction
#: emulator on some hosts lacks most vector instructions), no stack protector,
#: no calls to memset/memcpy synthesised from loops.
CFLAGS_COMMON = [
    "-std=gnu11", "-Os", "-Wall", "-Wextra", "-Werror",
    "-ffreestanding", "-fno-builtin", "-nostdlib", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fno-tree-loop-distribute-patterns",
    "-mgeneral-regs-only", "-mno-sse", "-mno-mmx", "-mno-80387",
    "-fno-common", f"-I{SRC}",
    # Guests touch fixed physical addresses (BDA, MP table): not array overruns.
    "-Wno-array-bounds", "-Wno-stringop-overflow",
]
CFLAGS_32 = ["-m32", "-march=i686", "-fno-pic", "-fno-pie"]
#: 64-bit code must be position independent: the bzImage may be loaded anywhere.
CFLAGS_64 = ["-m64", "-march=x86-64", "-mno-red-zone", "-fpie", "-fno-plt"]


class ToolchainError(RuntimeError):
    """gcc/binutils are missing or a guest failed to build."""


@dataclass(frozen=True)
class GuestSpec:
    """One guest: its output file name and the function that builds it (work dir, output path)."""

    name: str
    filename: str
    build: Callable[[Path, Path], None]
    description: str


def check_toolchain() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise ToolchainError(
            f"cannot build test guests: {', '.join(missing)} not found (install gcc and binutils)"
        )


def _run(cmd: list[str]) -> None:
    log.debug("guest build: %s", " ".join(map(str, cmd)))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"guest build step failed: {' '.join(map(str, cmd))}\n{proc.stderr}")


def _cc(src: Path, obj: Path, flags: list[str]) -> None:
    _run(["gcc", *CFLAGS_COMMON, *flags, "-c", src, "-o", obj])


def _link(objs: list[Path], script: Path, out: Path, emulation: str, extra: list[str] | None = None) -> None:
    _run(["ld", "-m", emulation, "-nostdlib", "--build-id=none", "-z", "noexecstack",
          "-T", script, *(extra or []), "-o", out, *objs])


def _bootsector(source: str) -> Callable[[Path, Path], None]:
    def build(work: Path, out: Path) -> None:
        obj = work / f"{source}.o"
        elf = work / f"{source}.elf"
        _cc(SRC / f"{source}.S", obj, CFLAGS_32)
        _link([obj], LD_DIR / "bootsector.ld", elf, "elf_i386")
        _run(["objcopy", "-O", "binary", elf, out])
        data = out.read_bytes()
        if len(data) != 512 or data[510:512] != b"\x55\xaa":
            raise ToolchainError(f"{source}: boot sector is {len(data)} bytes or lacks 0x55AA")
    return build


def _bigboot(work: Path, out: Path) -> None:
    obj, elf = work / "bigboot.o", work / "bigboot.elf"
    _cc(SRC / "bigboot.S", obj, CFLAGS_32)
    _link([obj], LD_DIR / "bigboot.ld", elf, "elf_i386")
    _run(["objcopy", "-O", "binary", elf, out])
    data = out.read_bytes()
    if len(data) != 0x8000 or data[510:512] != b"\x55\xaa":
        raise ToolchainError(f"bigboot: image is {len(data)} bytes or lacks 0x55AA")


def _multiboot(main_c: str, *, aout: bool = False, extra_s: tuple[str, ...] = ()) -> Callable[[Path, Path], None]:
    def build(work: Path, out: Path) -> None:
        tag = Path(out).stem
        defs = ["-DAOUT_KLUDGE"] if aout else []
        objs = [work / f"{tag}-entry.o", work / f"{tag}-lib.o", work / f"{tag}-main.o"]
        _cc(SRC / "mb_entry.S", objs[0], CFLAGS_32 + defs)
        _cc(SRC / "guestlib.c", objs[1], CFLAGS_32)
        _cc(SRC / main_c, objs[2], CFLAGS_32)
        for s in extra_s:
            objs.append(work / f"{tag}-{s}.o")
            _cc(SRC / s, objs[-1], CFLAGS_32)
        if aout:
            elf = work / f"{tag}.elf"
            _link(objs, LD_DIR / "multiboot.ld", elf, "elf_i386")
            _run(["objcopy", "-O", "binary", "-j", ".text", "-j", ".rodata", "-j", ".data", elf, out])
        else:
            _link(objs, LD_DIR / "multiboot.ld", out, "elf_i386")
    return build


def _pvh(work: Path, out: Path) -> None:
    objs = [work / "pvh-entry.o", work / "pvh-lib.o", work / "pvh-main.o"]
    _cc(SRC / "pvh_entry.S", objs[0], CFLAGS_32)
    _cc(SRC / "guestlib.c", objs[1], CFLAGS_32)
    _cc(SRC / "pvh.c", objs[2], CFLAGS_32)
    _link(objs, LD_DIR / "pvh.ld", out, "elf_i386")


def _bzimage(work: Path, out: Path) -> None:
    """A bzImage-format kernel: 16-bit setup + header, then 32/64-bit protected-mode code."""
    objs = [work / "bz-header.o", work / "bz-lib.o", work / "bz-main.o"]
    _cc(SRC / "bzimage.S", objs[0], CFLAGS_64)
    _cc(SRC / "guestlib.c", objs[1], CFLAGS_64)
    _cc(SRC / "linux64.c", objs[2], CFLAGS_64)
    # The loader may place the kernel anywhere (relocatable_kernel=1): refuse
    # any absolute relocation, which would silently tie the code to its link address.
    for obj in objs:
        relocs = subprocess.run(["readelf", "-rW", str(obj)], capture_output=True, text=True).stdout
        bad = [ln for ln in relocs.splitlines() if re.search(r"R_X86_64_(64|32|32S|16|8)\b", ln)]
        if bad:
            raise ToolchainError(f"linux64: absolute relocations in {obj.name}:\n" + "\n".join(bad))
    elf = work / "linux64.elf"
    _link(objs, LD_DIR / "bzimage.ld", elf, "elf_x86_64")
    _run(["objcopy", "-O", "binary", "-j", ".setup", "-j", ".pm", elf, out])
    data = bytearray(out.read_bytes())
    if data[0x202:0x206] != b"HdrS":
        raise ToolchainError("linux64: setup header signature missing")
    setup_size = (data[0x1F1] + 1) * 512
    pm_size = len(data) - setup_size
    if pm_size <= 0x200:
        raise ToolchainError(f"linux64: protected-mode part too small ({pm_size} bytes)")
    struct.pack_into("<I", data, 0x1F4, (pm_size + 15) // 16)  # syssize, in 16-byte units
    struct.pack_into("<I", data, 0x260, (pm_size + 0xFFF) & ~0xFFF)  # init_size
    out.write_bytes(bytes(data))


def _bzimage_32(work: Path, out: Path) -> None:
    """The same kernel without XLF_KERNEL_64: loaders must use the 32-bit entry (code32_start)."""
    _bzimage(work, out)
    data = bytearray(out.read_bytes())
    struct.pack_into("<H", data, 0x236, 0)  # xloadflags
    out.write_bytes(bytes(data))


GUESTS: dict[str, GuestSpec] = {
    g.name: g
    for g in (
        GuestSpec("realmode_hello", "realmode_hello.bin", _bootsector("realmode_hello"),
                  "real-mode boot sector: greeting on COM1, debug-exit 0x2a"),
        GuestSpec("serial_echo", "serial_echo.bin", _bootsector("serial_echo"),
                  "real-mode boot sector: upper-cases COM1 input until '.'"),
        GuestSpec("triple_fault", "triple_fault.bin", _bootsector("triple_fault"),
                  "boot sector: counts boots in CMOS, triple-faults on boot 1"),
        GuestSpec("bigboot", "bigboot.bin", _bigboot,
                  "32 KiB boot image (pyvmm extension): code past the first sector runs"),
        GuestSpec("multiboot_info", "multiboot_info.elf", _multiboot("multiboot_info.c"),
                  "multiboot ELF32: checks multiboot info and fw_cfg"),
        GuestSpec("multiboot_aout", "multiboot_aout.bin", _multiboot("multiboot_info.c", aout=True),
                  "the multiboot_info guest as a flat image with the a.out kludge"),
        GuestSpec("pvh", "pvh.elf", _pvh,
                  "ELF32 with the Xen PVH entry note: checks hvm_start_info"),
        GuestSpec("smp", "smp.elf", _multiboot("smp.c", extra_s=("smp_trampoline.S", "irq_stubs.S")),
                  "multiboot ELF32: starts APs with INIT/SIPI, each reports its APIC id"),
        GuestSpec("migrate_smp", "migrate_smp.elf",
                  _multiboot("migrate_smp.c", extra_s=("smp_trampoline.S", "irq_stubs.S")),
                  "multiboot ELF32, -smp 2: PIT via the I/O APIC on the BSP, LAPIC timer on the AP, ticks on COM1"),
        GuestSpec("irq", "irq.elf", _multiboot("irq.c", extra_s=("irq_stubs.S",)),
                  "multiboot ELF32: PIT and UART interrupts through the PIC or the I/O APIC"),
        GuestSpec("uart_regs", "uart_regs.elf", _multiboot("uart_regs.c"),
                  "multiboot ELF32: 16550A registers, loopback, FIFO, as drivers probe them"),
        GuestSpec("ioscan", "ioscan.elf", _multiboot("ioscan.c"),
                  "multiboot ELF32: reads every I/O port, straddling reads, an MMIO sweep"),
        GuestSpec("acpi", "acpi.elf", _multiboot("acpi.c"),
                  "multiboot ELF32: validates ACPI tables, then S5 power-off or FADT reset"),
        GuestSpec("fwcfg", "fwcfg.elf", _multiboot("fwcfg.c"),
                  "multiboot ELF32: fw_cfg corners (file dir, past-end reads, DMA skip/write/zero-fill)"),
        GuestSpec("cpuid", "cpuid.elf", _multiboot("cpuid.c"),
                  "multiboot ELF32: reports the main CPUID leaves"),
        GuestSpec("oob", "oob.elf", _multiboot("oob.c"),
                  "multiboot ELF32: DMA/string I/O/MMIO aimed outside RAM"),
        GuestSpec("linux64", "linux64.bzImage", _bzimage,
                  "bzImage with a 64-bit entry that checks boot_params"),
        GuestSpec("linux32", "linux32.bzImage", _bzimage_32,
                  "the linux64 bzImage without XLF_KERNEL_64 (entered through startup_32)"),
    )
}


def build_guest(name: str, outdir: Path) -> Path:
    """Build one guest into ``outdir`` (idempotent within one directory) and return its path."""
    check_toolchain()
    spec = GUESTS[name]
    outdir = Path(outdir)
    work = outdir / "obj"
    work.mkdir(parents=True, exist_ok=True)
    out = outdir / spec.filename
    if not out.exists():
        spec.build(work, out)
    return out


def build_all(outdir: Path, names: list[str] | None = None) -> dict[str, Path]:
    return {n: build_guest(n, outdir) for n in (names or list(GUESTS))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("names", nargs="*", help=f"guests to build (default all): {', '.join(GUESTS)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = [n for n in args.names if n not in GUESTS]
    if unknown:
        log.error("unknown guest(s) %s; known: %s", ", ".join(unknown), ", ".join(GUESTS))
        return 2
    try:
        for name, path in build_all(args.outdir, args.names or None).items():
            log.info("%-16s %-40s %s", name, path, GUESTS[name].description)
    except ToolchainError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
