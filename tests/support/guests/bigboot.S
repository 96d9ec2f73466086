/*
 * Large "boot sector" guest (pyvmm extension: a 512 B..64 KiB image with
 * 0x55AA at offset 510, loaded whole at 0000:7c00 and entered in real mode).
 * The first sector prints the boot drive (DL) and jumps to code in the last
 * 512 bytes of a 32 KiB image, which verifies a checksum over everything
 * after the first sector and exits through isa-debug-exit with 0x2b when it
 * matches (status 87), 0x2c when not.
 */
#define COM1 0x3f8
#define IMAGE_SIZE 0x8000
#define EXPECTED_SUM 0xc200        /* sum(i & 0xff for i in range(IMAGE_SIZE - 1024)) & 0xffff */

    .code16
    .text
    .globl _start
_start:
    cli
    cld
    ljmp $0, $1f
1:  xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    movb %dl, %bh                 /* keep DL */
    movw $dlmsg, %si
    call puts
    movb %bh, %al
    shrb $4, %al
    call hexdigit
    movb %bh, %al
    call hexdigit
    movb $'\n', %al
    call putc
    jmp far_code

hexdigit:
    andb $0x0f, %al
    addb $'0', %al
    cmpb $'9', %al
    jbe putc
    addb $('a' - '0' - 10), %al
    jmp putc
#include "rm_serial.inc"

dlmsg:
    .asciz "dl=0x"

    .org 510
    .word 0xaa55

    /* filler the checksum covers: byte i = i & 0xff */
    .set i, 0
    .rept IMAGE_SIZE - 512 - 512
    .byte i & 0xff
    .set i, i + 1
    .endr

far_code:
    /* sum of the bytes from 0x7e00 up to far_code, 16-bit wrap-around */
    movw $0x7e00, %si
    xorw %di, %di
    movw $(IMAGE_SIZE - 1024), %cx
    xorb %ah, %ah
1:  lodsb
    addw %ax, %di
    loop 1b
    movw $farmsg, %si
    call puts
    cmpw $EXPECTED_SUM, %di
    jne 2f
    movb $0x2b, %al
    outb %al, $0xf4
2:  movb $0x2c, %al
    outb %al, $0xf4
3:  hlt
    jmp 3b
farmsg:
    .asciz "running from the end of a 32 KiB boot image\n"
    .org IMAGE_SIZE
