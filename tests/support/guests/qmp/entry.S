/*
 * Multiboot v1 header and 32-bit entry of the QMP test guest.
 *
 * Both pyvmm and QEMU load an ELF32 multiboot kernel with -kernel and enter
 * here in flat 32-bit protected mode, paging off, interrupts off.  We set up
 * our own stack and run qmp_guest_main(magic, mbi); it never returns on success.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    cli
    cld
    movl $stack_top, %esp
    xorl %ebp, %ebp
    pushl %ebx                /* multiboot information */
    pushl %eax                /* multiboot magic */
    call qmp_guest_main
1:  cli
    hlt
    jmp 1b

    .bss
    .align 16
stack:
    .skip 16384
stack_top:
