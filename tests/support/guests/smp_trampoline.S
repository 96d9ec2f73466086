/*
 * AP start-up code for the SMP test guest.
 *
 * ap_tramp_start..ap_tramp_end is copied by the BSP to TRAMP_BASE (below
 * 1 MiB, page aligned) and reached through a SIPI with vector TRAMP_BASE>>12:
 * the AP starts in real mode at CS=0x0800, IP=0.  It loads a flat GDT that is
 * part of the copied block, enters protected mode and jumps to ap_entry32 in
 * the main image, which reads its APIC id from the LAPIC, takes a private
 * stack and calls ap_main(apic_id).
 */
#define TRAMP_BASE 0x8000
#define T(sym) (TRAMP_BASE + (sym) - ap_tramp_start)
#define LAPIC_ID 0xfee00020
#define MAX_APS 8
#define AP_STACK 1024

    .text
    .code16
    .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl T(tramp_gdt_desc)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $T(tramp_pm)
    .code32
tramp_pm:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $ap_entry32, %eax
    jmp *%eax
    .align 8
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
tramp_gdt_desc:
    .word tramp_gdt_desc - tramp_gdt - 1
    .long T(tramp_gdt)
ap_tramp_end:

    .code32
ap_entry32:
    movl LAPIC_ID, %eax
    shrl $24, %eax
    cmpl $MAX_APS, %eax
    jae 2f
    movl %eax, %ebx
    shll $10, %ebx
    leal ap_stacks + AP_STACK(%ebx), %esp
    pushl %eax
    call ap_main
2:  cli
    hlt
    jmp 2b

    .bss
    .align 16
ap_stacks:
    .skip MAX_APS * AP_STACK
