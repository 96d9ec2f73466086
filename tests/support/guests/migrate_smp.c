/*
 * Migration test guest (multiboot, 32-bit, run with -smp 2): interrupts and timers on two CPUs,
 * with serial output that is the same text on every run, however the VM is paused, saved,
 * migrated or slowed down, as long as its state survives.
 *
 * The BSP routes ISA IRQ0 (the PIT, 100 Hz) through the I/O APIC (pin 2, as the MP table says)
 * to itself; the AP, started with INIT/SIPI, runs its LAPIC timer periodically.  Both halt
 * between interrupts.  Only the BSP prints: "tick N ap" every 20 PIT interrupts, "ap" meaning
 * the AP's LAPIC-timer count moved since the previous line (waiting up to 5 s for it, so that
 * a busy host does not change the text; "ap-stalled" otherwise), until
 * "ticks=N" lines (default 20) are out; then "unexpected=0" (no stray vector), "done", and
 * debug-exit 0x21.  A vCPU, LAPIC, IOAPIC or PIT state lost in a migration shows as a missing
 * or stalled line, or a hang.
 *
 * With "dirty=K" the AP also rewrites K KiB of RAM at 4 MiB in rounds, each word a function of
 * the round, and checks the whole buffer after each round; the BSP's last lines then include
 * "dirty=ok" (rounds ran, no word wrong) or "dirty=BAD": a page a migration failed to resend
 * shows up as a stale word on the destination.
 */
#include "guest.h"

#define LAPIC_BASE 0xfee00000u
#define IOAPIC_BASE 0xfec00000u
#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define ICR_BUSY (1u << 12)
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_INIT_ASSERT (0x500u | (1u << 14))
#define ICR_STARTUP 0x600u
#define TRAMP_BASE 0x8000u
#define PIT_VEC 0x30
#define LTIMER_VEC 0x40
#define SPURIOUS_VEC 0xff
#define PIT_HZ 1193182u
#define TICKS_PER_LINE 20u

struct idt_gate {
    u16 off_lo, sel;
    u8 zero, type;
    u16 off_hi;
} __attribute__((packed));

extern const u32 isr_table[256];
extern const u8 ap_tramp_start[], ap_tramp_end[];
void load_flat_gdt(void);

static struct idt_gate idt[256] __attribute__((aligned(8)));
static volatile u32 pit_ticks, ap_ticks, ap_up, unexpected;
static volatile u32 dirty_kib, dirty_rounds, dirty_bad;
#define DIRTY_BASE 0x400000u

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

static void load_idt(void)
{
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u32)(uptr)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

static void build_idt(void)
{
    for (int v = 0; v < 256; v++) {
        idt[v].off_lo = (u16)isr_table[v];
        idt[v].off_hi = (u16)(isr_table[v] >> 16);
        idt[v].sel = 0x08;
        idt[v].zero = 0;
        idt[v].type = 0x8e;
    }
}

void irq_dispatch(u32 vec)
{
    if (vec == SPURIOUS_VEC)
        return; /* no EOI for a spurious interrupt */
    if (vec == PIT_VEC)
        pit_ticks++;
    else if (vec == LTIMER_VEC)
        ap_ticks++;
    else
        unexpected++;
    lapic_write(LAPIC_EOI, 0);
}

void ap_main(u32 apic_id)
{
    (void)apic_id;
    load_idt();
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VEC);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_TIMER_DIV, 0x3);                        /* divide by 16 */
    lapic_write(LAPIC_LVT_TIMER, (1u << 17) | LTIMER_VEC);    /* periodic */
    lapic_write(LAPIC_TIMER_INIT, 200000);
    ap_up = 1;
    __asm__ volatile("sti");
    volatile u32 *buf = (volatile u32 *)DIRTY_BASE;
    u32 words = dirty_kib * 256u;
    for (u32 round = 1; words; round++) {
        u32 v = round * 0x9e3779b1u;
        for (u32 i = 0; i < words; i++)
            buf[i] = v + i;
        for (u32 i = 0; i < words; i++) {
            if (buf[i] != v + i) {
                dirty_bad++;
                break;
            }
        }
        dirty_rounds = round;
    }
    for (;;)
        __asm__ volatile("sti; hlt" ::: "memory");
}

static void delay(u32 n)
{
    for (volatile u32 i = 0; i < n; i++)
        cpu_relax();
}

static void send_ipi(u32 icr)
{
    lapic_write(LAPIC_ICR_HI, 0);
    lapic_write(LAPIC_ICR_LO, icr);
    for (int i = 0; i < 100000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
        cpu_relax();
}

static void ioapic_route(u32 pin, u32 vector, u32 dest)
{
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin + 1);
    mmio_write32(IOAPIC_BASE + 0x10, dest << 24);
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin);
    mmio_write32(IOAPIC_BASE + 0x10, vector); /* fixed, physical, edge, active high, unmasked */
}

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    const char *cmdline = (mbi[0] & 4) && mbi[4] ? (const char *)(uptr)mbi[4] : "";
    u32 lines = (u32)cmdline_get_num(cmdline, "ticks", 20);
    u32 kib = (u32)cmdline_get_num(cmdline, "dirty", 0);
    dirty_kib = kib > 16384 ? 16384 : kib; /* at most 16 MiB, from 4 MiB: -m 32 is enough */
    dirty_rounds = dirty_bad = 0;

    pit_ticks = ap_ticks = ap_up = unexpected = 0;
    uart_init();
    uart_puts("migrate guest\n");
    outb(0x21, 0xff); /* the legacy PIC stays masked: everything goes through the APICs */
    outb(0xa1, 0xff);
    load_flat_gdt();
    build_idt();
    load_idt();
    u32 bsp = lapic_read(LAPIC_ID) >> 24;
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VEC);
    lapic_write(LAPIC_TPR, 0);

    memcpy((void *)TRAMP_BASE, ap_tramp_start, (uptr)(ap_tramp_end - ap_tramp_start));
    send_ipi(ICR_ALL_BUT_SELF | ICR_INIT_ASSERT);
    delay(10000);
    for (int i = 0; i < 2 && !ap_up; i++) {
        send_ipi(ICR_ALL_BUT_SELF | ICR_STARTUP | (TRAMP_BASE >> 12));
        delay(2000);
    }
    for (u32 i = 0; i < 3000000 && !ap_up; i++)
        cpu_relax();
    report_dec("ap_up", ap_up);

    ioapic_route(2, PIT_VEC, bsp);
    outb(0x43, 0x34); /* PIT channel 0, lo/hi, mode 2, 100 Hz */
    outb(0x40, (u8)(PIT_HZ / 100));
    outb(0x40, (u8)((PIT_HZ / 100) >> 8));

    u32 last_ap = ap_ticks;
    for (u32 n = 1; n <= lines;) {
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        if (pit_ticks >= n * TICKS_PER_LINE) {
            /* The AP's timer must have fired since the last line; a busy host may not have run
             * its vCPU for a while, so give it up to 5 s (500 PIT ticks) before calling it stalled. */
            for (u32 limit = pit_ticks + 500; ap_ticks == last_ap && pit_ticks < limit;)
                __asm__ volatile("sti; hlt; cli" ::: "memory");
            u32 now = ap_ticks;
            uart_puts("tick ");
            uart_putdec(n);
            uart_puts(now != last_ap ? " ap\n" : " ap-stalled\n");
            last_ap = now;
            n++;
        }
    }
    report_dec("unexpected", unexpected);
    if (dirty_kib)
        uart_puts(dirty_rounds && !dirty_bad ? "dirty=ok\n" : "dirty=BAD\n");
    if (cmdline_get_num(cmdline, "verbose", 0)) {
        report_dec("dirty_rounds", dirty_rounds);
        report_dec("dirty_bad", dirty_bad);
    }
    uart_puts("done\n");
    debug_exit(0x21);
}
