/*
 * Multiboot v1 header and 32-bit entry shared by the multiboot test guests.
 *
 * Entered in 32-bit protected mode, paging off, EAX = 0x2BADB002 and
 * EBX = physical address of the multiboot information.  The loader's GDT
 * and stack are not to be trusted, so we set up our own stack and call
 * guest_main(magic, mbi, entry_eflags).  With -DAOUT_KLUDGE the header carries the load
 * addresses (flag bit 16) so the same code can be shipped as a flat image.
 */
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003   /* page-align modules, want memory info, addresses in header */
#else
#define MB_FLAGS 0x00000003
#endif

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
    .long mb_header          /* header_addr */
    .long __image_start      /* load_addr */
    .long __data_end         /* load_end_addr */
    .long __bss_end          /* bss_end_addr */
    .long _start             /* entry_addr */
#endif

    .text
    .code32
    .globl _start
_start:
    movl $boot_stack_top, %esp
    pushfl                    /* EFLAGS as the loader left them, for the checks */
    popl %ecx
    cli
    cld
    xorl %ebp, %ebp
    pushl %ecx                /* entry_eflags */
    pushl %ebx                /* mbi */
    pushl %eax                /* magic */
    call guest_main
1:  cli
    hlt
    jmp 1b

    .bss
    .align 16
    .globl boot_stack
boot_stack:
    .skip 16384
boot_stack_top:
