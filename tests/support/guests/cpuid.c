/*
 * CPUID report guest (multiboot, 32-bit): prints the leaves a kernel looks at
 * first, as "cpuid_<leaf>=eax ebx ecx edx" lines, so the test can check that
 * --cpu feature edits reach the guest and nothing else changes, and the
 * topology leaves (0xB sub-leaves 0-2, "cpuid_b.N", and leaf 4 sub-leaf 0) so
 * it can check that -smp reaches CPUID.  Always exits
 * with isa-debug-exit value 1 once the report is complete.
 */
#include "guest.h"

static void cpuid(u32 leaf, u32 sub, u32 r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void report_leaf(const char *name, u32 leaf, u32 sub)
{
    u32 r[4];
    cpuid(leaf, sub, r);
    uart_puts("cpuid_");
    uart_puts(name);
    uart_putc('=');
    for (int i = 0; i < 4; i++) {
        uart_puthex(r[i]);
        uart_putc(i < 3 ? ' ' : '\n');
    }
}

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    (void)mbi;
    uart_init();
    uart_puts("cpuid guest\n");
    report_leaf("0", 0, 0);
    report_leaf("1", 1, 0);
    report_leaf("7", 7, 0);
    report_leaf("80000000", 0x80000000u, 0);
    report_leaf("80000001", 0x80000001u, 0);
    report_leaf("40000000", 0x40000000u, 0);
    report_leaf("4.0", 4, 0);
    report_leaf("b.0", 0xB, 0);
    report_leaf("b.1", 0xB, 1);
    report_leaf("b.2", 0xB, 2);
    debug_exit(1);
}
