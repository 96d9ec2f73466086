/*
 * Boot-sector guest: serial echo.  Announces "echo ready", then reads bytes
 * from COM1 (polling LSR.DR), echoes each one upper-cased, and on '.' prints
 * "\nbye\n" and exits through isa-debug-exit with (bytes echoed & 0x7f), so the
 * test knows exactly how many input bytes reached the guest.
 */
#define COM1 0x3f8
#define MARKER '.'

    .code16
    .text
    .globl _start
_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    ljmp $0, $1f
1:
    movw $ready, %si
    call puts
    xorw %di, %di             /* DI = bytes echoed */
next:
    movw $COM1 + 5, %dx
2:  inb %dx, %al              /* wait for data: no bound, the test has a timeout */
    testb $0x01, %al
    jz 2b
    movw $COM1, %dx
    inb %dx, %al
    cmpb $MARKER, %al
    je done
    cmpb $'a', %al
    jb 3f
    cmpb $'z', %al
    ja 3f
    subb $0x20, %al
3:  call putc
    incw %di
    jmp next
done:
    movw $bye, %si
    call puts
    movw %di, %ax
    andb $0x7f, %al
    outb %al, $0xf4
4:  hlt
    jmp 4b

#include "rm_serial.inc"

ready:
    .asciz "echo ready\n"
bye:
    .asciz "\nbye\n"
