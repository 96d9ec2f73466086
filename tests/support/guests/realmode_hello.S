/*
 * Boot-sector guest: entered in real mode at 0000:7c00.  Prints a greeting
 * on COM1 (polling LSR.THRE with a bounded loop) and leaves through
 * isa-debug-exit with EXIT_VALUE, so the process status is (0x2a<<1)|1 = 85.
 */
#define COM1 0x3f8
#define EXIT_VALUE 0x2a

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
    ljmp $0, $1f              /* some loaders enter at 07c0:0000 */
1:
    movw $msg, %si
    call puts
    movb $EXIT_VALUE, %al
    outb %al, $0xf4
5:  hlt
    jmp 5b

#include "rm_serial.inc"

msg:
    .asciz "Hello from real mode\n"
