/*
 * PVH entry for the PVH test guest: an ELF note XEN_ELFNOTE_PHYS32_ENTRY (18)
 * gives the 32-bit entry point.  Entered in 32-bit protected mode, paging
 * off, EBX = physical address of struct hvm_start_info.  We set our own stack
 * and call pvh_main(start_info, entry_eflags, entry_cs).
 */
    .section .note.Xen, "a"
    .align 4
    .long 4                  /* namesz: "Xen\0" */
    .long 4                  /* descsz */
    .long 18                 /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .text
    .code32
    .globl pvh_start
pvh_start:
    movl $pvh_stack_top, %esp
    pushfl
    popl %ecx
    cli
    cld
    xorl %eax, %eax
    movw %cs, %ax
    pushl %eax               /* entry_cs */
    pushl %ecx               /* entry_eflags */
    pushl %ebx               /* start_info */
    call pvh_main
1:  cli
    hlt
    jmp 1b

    .bss
    .align 16
pvh_stack:
    .skip 16384
pvh_stack_top:
