/*
 * Interrupt plumbing for the IRQ test guest: a flat GDT of our own (the
 * multiboot loader's GDT may be gone), and 256 tiny entry stubs that push
 * their vector and call irq_dispatch(vector).  Exceptions that push an error
 * code would unbalance the return, but irq_dispatch never returns from those.
 */
    .text
    .code32
    .globl load_flat_gdt
load_flat_gdt:
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    ret

    .altmacro
    .macro isr_stub n
isr_\n:
    pushal
    pushl $\n
    jmp isr_common
    .endm
    .macro isr_addr n
    .long isr_\n
    .endm

    .set vec, 0
    .rept 256
    isr_stub %vec
    .set vec, vec + 1
    .endr

isr_common:
    cld
    call irq_dispatch
    addl $4, %esp
    popal
    /*
     * Return without IRET: some KVM hosts (kvm_pvm) emulate ring-0 code and
     * their instruction emulator cannot execute a protected-mode IRET.  For a
     * same-privilege return to the same CS this is equivalent: turn the frame
     * [EIP][CS][EFLAGS] into [EFLAGS][EIP], then POPF and RET.
     */
    pushl %eax                  /* [EAX][EIP][CS][EFLAGS] */
    movl 4(%esp), %eax
    xchgl %eax, 12(%esp)        /* [EAX][EIP][CS][EIP], EAX = EFLAGS */
    movl %eax, 8(%esp)          /* [EAX][EIP][EFLAGS][EIP] */
    popl %eax
    addl $4, %esp               /* [EFLAGS][EIP] */
    popfl
    ret

    .section .rodata
    .align 4
    .globl isr_table
isr_table:
    .set vec, 0
    .rept 256
    isr_addr %vec
    .set vec, vec + 1
    .endr

    .data
    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
