/*
 * Boot-sector guest: machine resets and reboot counting.
 *
 * Each boot increments a counter kept in CMOS RAM (index 0x7d, valid when
 * index 0x7c holds 0xa5): CMOS survives a machine reset but not a new process.
 *   boot 1: prints "boot 1", switches to protected mode, loads an IDT with
 *           limit 0 and executes UD2: #UD cannot be delivered -> #GP -> #DF ->
 *           shutdown (triple fault);
 *   boot 2: prints "boot 2" and pulses reset through the keyboard controller
 *           (0xfe -> port 0x64);
 *   boot 3: prints "boot 3", clears the magic and exits through isa-debug-exit
 *           with 0x10 + 3 (status 39), or 0x50 + 3 (status 167) if the image
 *           was not reloaded on reset (a flag byte the previous boot set in
 *           its own copy of the image is still set).
 * With -no-reboot the VMM exits after boot 1.
 */
#define COM1 0x3f8
#define CMOS_MAGIC_IDX 0x7c
#define CMOS_COUNT_IDX 0x7d
#define MAGIC 0xa5

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
    cmpb $0, image_dirty          /* a fresh copy of the image has 0 here */
    je 1f
    orb $0x40, exit_flags
1:  movb $1, image_dirty
    movb $CMOS_MAGIC_IDX, %al
    call cmos_read
    cmpb $MAGIC, %al
    je 2f
    movb $CMOS_MAGIC_IDX, %al
    movb $MAGIC, %ah
    call cmos_write
    movb $CMOS_COUNT_IDX, %al
    movb $0, %ah
    call cmos_write
2:  movb $CMOS_COUNT_IDX, %al
    call cmos_read
    incb %al
    movb %al, %ah
    movb %al, boot_count
    movb $CMOS_COUNT_IDX, %al
    call cmos_write

    movw $bootmsg, %si
    call puts
    movb boot_count, %al
    addb $'0', %al
    call putc
    movb $'\n', %al
    call putc

    cmpb $2, boot_count
    jb fault
    je kbd_reset
    movb $CMOS_MAGIC_IDX, %al    /* leave CMOS clean */
    movb $0, %ah
    call cmos_write
    movb boot_count, %al
    addb $0x10, %al
    orb exit_flags, %al
    outb %al, $0xf4
3:  hlt
    jmp 3b

kbd_reset:
    movw $kbdmsg, %si
    call puts
    movw $1000, %cx              /* wait (bounded) for the input buffer to drain */
1:  inb $0x64, %al
    testb $0x02, %al
    jz 2f
    loop 1b
2:  movb $0xfe, %al
    outb %al, $0x64
    jmp 3b

fault:
    movw $faultmsg, %si
    call puts
    lgdt gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $pm32
    .code32
pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %ss
    lidt idt_desc
    ud2
    hlt
    .code16

/* cmos_read: AL = index -> AL = value */
cmos_read:
    outb %al, $0x70
    inb $0x71, %al
    ret
/* cmos_write: AL = index, AH = value */
cmos_write:
    outb %al, $0x70
    movb %ah, %al
    outb %al, $0x71
    ret

#include "rm_serial.inc"

    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: flat data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
idt_desc:
    .word 0                     /* limit 0: no vector can be delivered */
    .long 0
boot_count:
    .byte 0
exit_flags:
    .byte 0
image_dirty:
    .byte 0
kbdmsg:
    .asciz "keyboard controller reset now\n"
bootmsg:
    .asciz "boot "
faultmsg:
    .asciz "triple fault now\n"
