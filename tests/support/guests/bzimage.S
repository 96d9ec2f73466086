/*
 * A minimal kernel in bzImage format (Linux x86 boot protocol 2.15).
 *
 * File layout:
 *   0x000  boot sector stub (never executed by a boot-protocol loader)
 *   0x1f1  setup header ("HdrS", version 0x020f, XLF_KERNEL_64, relocatable)
 *   0x200  2-byte jump to the 16-bit setup code (used only when a loader
 *          enters in real mode, as QEMU's linuxboot option ROM does)
 *   ...    (SETUP_SECTS + 1) * 512 bytes of setup in all
 *   then   the protected-mode part: startup_32 at +0, startup_64 at +0x200
 *
 * pyvmm enters startup_64 directly in long mode with RSI = boot_params.  The
 * 16-bit and 32-bit paths exist so the very same file can be validated under
 * QEMU: the setup code builds boot_params (header copy + BIOS E820 map),
 * enters protected mode at code32_start, which enables long mode with a
 * 16 GiB identity map and jumps to startup_64 like Linux does.
 *
 * syssize and init_size are filled in by build.py after linking.
 */
#define SETUP_SECTS 3
#define BP_SEG 0x4000              /* real-mode path: boot_params at 0x40000 */
#define BP_LIN 0x40000
#define PT_BASE 0x70000            /* 32-bit path: PML4, PDPT, 16 PDs at 0x70000-0x81fff */
#define S(sym) ((sym) - _setup_start)

    .section .setup, "ax"
    .code16
    .globl _setup_start
_setup_start:
    /* Boot sector stub: a real BIOS must not try to run this. */
    cli
1:  hlt
    jmp 1b

    .org 0x1f1
hdr:
setup_sects:        .byte SETUP_SECTS
root_flags:         .word 0
syssize:            .long 0                 /* patched by build.py */
ram_size:           .word 0
vid_mode:           .word 0xffff
root_dev:           .word 0
boot_flag:          .word 0xaa55
    .org 0x200
                    .byte 0xeb, setup_start - 1f   /* must stay below 128 */
1:                  .ascii "HdrS"
version:            .word 0x020f
realmode_swtch:     .long 0
start_sys_seg:      .word 0x1000
kernel_version:     .word S(kver) - 0x200
type_of_loader:     .byte 0
loadflags:          .byte 0x01              /* LOADED_HIGH */
setup_move_size:    .word 0x8000
code32_start:       .long 0x100000
ramdisk_image:      .long 0
ramdisk_size:       .long 0
bootsect_kludge:    .long 0
heap_end_ptr:       .word 0
ext_loader_ver:     .byte 0
ext_loader_type:    .byte 0
cmd_line_ptr:       .long 0
initrd_addr_max:    .long 0x7fffffff
kernel_alignment:   .long 0x200000
relocatable_kernel: .byte 1
min_alignment:      .byte 21
xloadflags:         .word 0x0001            /* XLF_KERNEL_64 */
cmdline_size:       .long 2047
hardware_subarch:   .long 0
hardware_subarch_data: .quad 0
payload_offset:     .long 0
payload_length:     .long 0
setup_data:         .quad 0
pref_address:       .quad 0x1000000
init_size:          .long 0                 /* patched by build.py */
handover_offset:    .long 0
kernel_info_offset: .long 0
hdr_end:

/*
 * 16-bit setup (real-mode entry): CS = DS = setup segment, offsets from the
 * start of the file.  Zero boot_params, copy the header, collect E820 from the
 * BIOS, then enter protected mode at code32_start with ESI = boot_params.
 */
setup_start:
    cli
    cld
    movw %ds, %ax
    movw %ax, %ss
    movw $0xfff0, %sp
    movw $BP_SEG, %ax
    movw %ax, %es
    xorw %di, %di                       /* zero boot_params */
    xorw %ax, %ax
    movw $2048, %cx
    rep stosw
    movw $S(hdr), %si                   /* copy the setup header */
    movw $0x1f1, %di
    movw $(hdr_end - hdr), %cx
    rep movsb

    movw $0x2d0, %di                    /* BIOS E820 into e820_table */
    xorl %ebx, %ebx
    xorw %bp, %bp
2:  movl $0xe820, %eax
    movl $0x534d4150, %edx
    movl $20, %ecx
    int $0x15
    jc 3f
    cmpl $0x534d4150, %eax
    jne 3f
    incw %bp
    addw $20, %di
    cmpw $128, %bp
    jae 3f
    testl %ebx, %ebx
    jnz 2b
3:  movw %bp, %ax
    movb %al, %es:0x1e8

    xorl %eax, %eax                     /* GDT base = linear address of gdt */
    movw %ds, %ax
    shll $4, %eax
    addl $S(gdt), %eax
    movl %eax, S(gdt_desc) + 2
    movl S(code32_start), %eax
    movl %eax, S(farptr)
    lgdtl S(gdt_desc)
    movl $BP_LIN, %esi
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl *S(farptr)

    .align 8
gdt:
    .quad 0
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x10: __BOOT_CS, flat 32-bit code */
    .quad 0x00cf92000000ffff            /* 0x18: __BOOT_DS */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long 0
farptr:
    .long 0
    .word 0x10
kver:
    .asciz "pyvmm-test-guest linux64"

    .org (SETUP_SECTS + 1) * 512

/* ---------------------------------------------------------------------------- */
    .section .pm.head, "ax"
    .code32
    .globl startup_32
startup_32:
    /* 32-bit entry, ESI = boot_params, flat segments, no stack promised. */
    cli
    cld
    movw $0x18, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    leal 0x1e8(%esi), %esp              /* boot_params.scratch as a 4-byte stack */
    call 1f
1:  popl %ebp
    subl $(1b - startup_32), %ebp       /* EBP = load address */
    movl $1, (entered_via_32 - startup_32)(%ebp)

    movl $PT_BASE, %edi                 /* identity map 0..16 GiB with 2 MiB pages */
    xorl %eax, %eax
    movl $(18 * 4096 / 4), %ecx         /* PML4, PDPT, 16 page directories */
    rep stosl
    movl $(PT_BASE + 0x1003), PT_BASE
    movl $PT_BASE + 0x1000, %edi        /* PDPT[0..15] -> PD 0..15 */
    movl $(PT_BASE + 0x2003), %eax
    movl $16, %ecx
3:  movl %eax, (%edi)
    addl $0x1000, %eax
    addl $8, %edi
    loop 3b
    movl $PT_BASE + 0x2000, %edi        /* 8192 PDEs: 2 MiB pages, the top bits in the high dword */
    xorl %eax, %eax
    xorl %edx, %edx
    movl $8192, %ecx
2:  movl %eax, %ebx
    orl $0x83, %ebx
    movl %ebx, (%edi)
    movl %edx, 4(%edi)
    addl $0x200000, %eax
    adcl $0, %edx
    addl $8, %edi
    loop 2b

    leal (gdt64 - startup_32)(%ebp), %eax
    movl %eax, (gdt64_desc - startup_32 + 2)(%ebp)
    lgdt (gdt64_desc - startup_32)(%ebp)
    movl %cr4, %eax
    orl $0x20, %eax                     /* PAE */
    movl %eax, %cr4
    movl $PT_BASE, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx              /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax               /* PG | PE */
    movl %eax, %cr0
    leal 0x200(%ebp), %eax
    pushl $0x10
    pushl %eax
    lret

    .align 8
gdt64:
    .quad 0
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x10: 64-bit code */
    .quad 0x00cf92000000ffff            /* 0x18: data */
gdt64_desc:
    .word gdt64_desc - gdt64 - 1
    .long 0
    .globl entered_via_32
entered_via_32:                         /* set when the loader used the 32-bit entry */
    .long 0

    .org 0x200
    .code64
    .globl startup_64
startup_64:
    /* 64-bit entry: RSI = boot_params, identity mapping, no stack promised. */
    cli
    cld
    leaq stack_top(%rip), %rsp
    movq %rsi, %rdi                     /* linux64_main(boot_params, load_address) */
    leaq startup_32(%rip), %rsi
    call linux64_main
3:  cli
    hlt
    jmp 3b

    .section .pm.bss, "aw"
    .align 16
stack:
    .skip 8192
stack_top:
