"""Each boot path entered for real on /dev/kvm: tiny guests check their entry state themselves.

Every guest verifies what its boot protocol promises (magic registers,
zero page / start-info / multiboot-info contents, command line), prints a
letter on COM1 and reports through isa-debug-exit: 0x10 (exit status 33)
means every check passed, 0x20 (status 65) means one failed.  They run
through the ``pyvmm run`` command line, so the whole path from file
detection to the vCPU's first instruction is exercised.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from support.conftest_boot import make_bzimage

PASS_STATUS = 33  # (0x10 << 1) | 1
EXIT = """
pass:   movb $0x10, %al
        outb %al, $0xf4
        hlt
fail:   movb $0x20, %al
        outb %al, $0xf4
        hlt
"""
PUTC = """
        movw $0x3f8, %dx
        movb ${c}, %al
        outb %al, %dx
"""


@pytest.fixture(scope="module", autouse=True)
def _need_tools():
    assert os.path.exists("/dev/kvm"), "/dev/kvm is needed to run the boot-path guests"
    for tool in ("gcc", "ld", "objcopy"):
        assert shutil.which(tool), f"{tool} is needed to build the boot-path guests"


def assemble(tmp_path, name: str, source: str, ld_args: list[str], bits: int = 64) -> str:
    src = tmp_path / f"{name}.S"
    src.write_text(source)
    obj = tmp_path / f"{name}.o"
    out = tmp_path / name
    subprocess.run(["gcc", "-c", "-m32" if bits == 32 else "-m64", str(src), "-o", str(obj)], check=True)
    emu = "elf_i386" if bits == 32 else "elf_x86_64"
    subprocess.run(["ld", "-m", emu, "-static", "-nostdlib", "-z", "max-page-size=0x1000", *ld_args,
                    "-o", str(out), str(obj)], check=True)
    return str(out)


def run(tmp_path, kernel: str, *extra: str) -> tuple[int, str, str]:
    serial = tmp_path / "serial.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "--accel", "kvm", "--kernel", kernel, "-m", "64M",
         "--device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "--serial", f"file:{serial}",
         "--no-reboot", *extra],
        capture_output=True, text=True, timeout=120)
    out = serial.read_text() if serial.exists() else ""
    return proc.returncode, out, proc.stderr


def test_multiboot_guest(tmp_path):
    src = """
        .code32
        .text
        .globl _start
_start:
        .balign 4
hdr:    .long 0x1BADB002, 0x00010003, -(0x1BADB002 + 0x00010003)
        .long hdr, _start, 0, 0, entry
entry:
        cmpl $0x2BADB002, %eax
        jne fail
        cmpl $0x10, %esp          # a usable stack is not promised; ours is at 0x8ff0
        jb fail
        movl (%ebx), %ecx         # flags: mem, cmdline, mmap, loader name
        andl $0x245, %ecx
        cmpl $0x245, %ecx
        jne fail
        cmpl $639, 4(%ebx)        # mem_lower
        jne fail
        movl 16(%ebx), %esi       # cmdline = "<path> hello"
        movl %cr0, %ecx
        testl $0x80000000, %ecx   # paging off
        jnz fail
""" + PUTC.format(c="'M'") + "        jmp pass\n" + EXIT
    kernel = assemble(tmp_path, "mb.bin", src, ["-Ttext=0x100000", "--oformat", "binary"], bits=32)
    status, out, err = run(tmp_path, kernel, "--append", "hello")
    assert (status, out) == (PASS_STATUS, "M"), err


def test_vmlinux_long_mode_guest(tmp_path):
    src = """
        .code64
        .text
        .globl _start
_start:
        cmpq $0x1000, %rsi
        jne fail
        cmpl $0x53726448, 0x202(%rsi)     # "HdrS" in the zero page
        jne fail
        movl 0x228(%rsi), %ecx            # cmd_line_ptr
        cmpl $0x6c6c6568, (%rcx)          # "hell"
        jne fail
        cmpb $3, 0x1e8(%rsi)              # at least RAM, EBDA/BIOS hole, RAM
        jb fail
        movq %cr0, %rax
        btq $31, %rax                     # paging on
        jnc fail
        movl $0x3ffff00, %ebx             # last page of the 64 MiB of RAM, through the identity map
        movl $0x5a5a5a5a, (%rbx)
        cmpl $0x5a5a5a5a, (%rbx)
        jne fail
""" + PUTC.format(c="'L'") + "        jmp pass\n" + EXIT
    link = tmp_path / "k.ld"
    link.write_text("ENTRY(_start)\nSECTIONS { . = 0xffffffff81000000; .text : AT(0x1000000) { *(.text) } }\n")
    kernel = assemble(tmp_path, "vmlinux", src, ["-T", str(link)])
    status, out, err = run(tmp_path, kernel, "--append", "hello")
    assert (status, out) == (PASS_STATUS, "L"), err


def test_pvh_guest(tmp_path):
    src = """
        .section .note.Xen, "a", @note
        .balign 4
        .long 4, 8, 18
        .asciz "Xen"
        .balign 4
        .quad pvh_start
        .text
        .code32
        .globl pvh_start
pvh_start:
        cmpl $0x336ec578, (%ebx)
        jne fail
        cmpl $1, 4(%ebx)                  # version
        jne fail
        movl 24(%ebx), %ecx               # cmdline_paddr
        cmpl $0x6c6c6568, (%ecx)
        jne fail
        cmpl $3, 48(%ebx)                 # memmap_entries
        jb fail
        movl 40(%ebx), %ecx               # memmap_paddr: first entry is RAM at 0
        cmpl $0, (%ecx)
        jne fail
        cmpl $1, 16(%ecx)                 # type RAM
        jne fail
""" + PUTC.format(c="'P'") + "        jmp pass\n" + EXIT + """
        .code64
        .globl _start
_start: jmp fail
"""
    kernel = assemble(tmp_path, "pvh.elf", src, ["-Ttext=0x200000"])
    status, out, err = run(tmp_path, kernel, "--append", "hello")
    assert (status, out) == (PASS_STATUS, "P"), err


def test_bzimage_64bit_entry_guest(tmp_path):
    """A bzImage whose protected-mode part is a test program: 32-bit code at 0, 64-bit code at 0x200."""
    src = """
        .text
        .code32
start32:
        jmp fail32
        .org 0x200
        .code64
start64:
        cmpq $0x1000, %rsi
        jne fail
        cmpl $0x53726448, 0x202(%rsi)
        jne fail
        cmpb $0xff, 0x210(%rsi)           # type_of_loader
        jne fail
        cmpl $0x1000000, 0x214(%rsi)      # code32_start = load address
        jne fail
        movl 0x228(%rsi), %ecx
        cmpl $0x6c6c6568, (%rcx)
        jne fail
        movl 0x218(%rsi), %ecx            # ramdisk_image
        cmpl $0x44524e49, (%rcx)          # "INRD"
        jne fail
        movw %ds, %ax
        cmpw $0x18, %ax                   # __BOOT_DS
        jne fail
        movw %cs, %ax
        cmpw $0x10, %ax                   # __BOOT_CS
        jne fail
""" + PUTC.format(c="'B'") + "        jmp pass\n" + EXIT + """
        .code32
fail32: movb $0x20, %al
        outb %al, $0xf4
        hlt
"""
    blob = assemble(tmp_path, "pm.bin", src, ["-Ttext=0", "--oformat", "binary"])
    with open(blob, "rb") as f:
        code = f.read()
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(code))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"INRD" + bytes(5000))
    status, out, err = run(tmp_path, str(kernel), "--append", "hello", "--initrd", str(initrd))
    assert (status, out) == (PASS_STATUS, "B"), err


def test_bzimage_32bit_entry_guest(tmp_path):
    """A protocol-2.10 image (no xloadflags) is entered at its 32-bit entry with ESI = zero page."""
    src = """
        .text
        .code32
start32:
        cmpl $0x1000, %esi
        jne fail
        cmpl $0x53726448, 0x202(%esi)
        jne fail
        movw %ds, %ax
        cmpw $0x18, %ax
        jne fail
        movw %cs, %ax
        cmpw $0x10, %ax
        jne fail
        testl %ebx, %ebx                  # EBP, EDI, EBX must be zero
        jnz fail
        testl %edi, %edi
        jnz fail
        testl %ebp, %ebp
        jnz fail
""" + PUTC.format(c="'3'") + "        jmp pass\n" + EXIT
    blob = assemble(tmp_path, "pm.bin", src, ["-Ttext=0", "--oformat", "binary"], bits=32)
    with open(blob, "rb") as f:
        code = f.read()
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(code, version=0x020A, xloadflags=0))
    status, out, err = run(tmp_path, str(kernel))
    assert (status, out) == (PASS_STATUS, "3"), err


def test_boot_sector_guest(tmp_path):
    src = """
        .code16
        .text
        .globl _start
_start:
        cmpb $0x80, %dl
        jne fail
        movw %cs, %ax
        testw %ax, %ax
        jnz fail
        call 1f
1:      popw %ax                          # IP after the call: proves we run at 0x7c00
        cmpw $0x7c00 + (1b - _start), %ax
        jne fail
""" + PUTC.format(c="'R'") + "        jmp pass\n" + EXIT + """
        .org 510
        .byte 0x55, 0xaa
"""
    kernel = assemble(tmp_path, "bs.img", src, ["-Ttext=0x7c00", "--oformat", "binary"], bits=32)
    assert os.path.getsize(kernel) == 512
    status, out, err = run(tmp_path, kernel)
    assert (status, out) == (PASS_STATUS, "R"), err
