/*
 * Interrupt test guest (multiboot, 32-bit): hardware interrupts through the
 * VMM's interrupt controllers, the PIT and the UART.
 *
 * Mode "apic=0" (default) uses the 8259 PIC (vectors 0x20-0x2f); "apic=1"
 * masks the PIC and routes through the I/O APIC as the MP table says:
 * ISA IRQ0 (PIT) -> pin 2, IRQ4 (COM1) -> pin 4, with the LAPIC EOI.
 *
 *  1. the PIT (channel 0, 100 Hz) must deliver >= 10 timer interrupts
 *     within ~3 s (timed with the RTC seconds, so the wait is bounded);
 *  2. enabling the UART's THR-empty interrupt must raise IRQ4 with IIR = 0x2;
 *  3. bytes arriving on the UART (the test pipes "ping." to stdin) must
 *     raise receive interrupts; the handler collects them until '.';
 *  4. no exception or unexpected vector may occur;
 *  5. a line transmitted one byte per THR-empty interrupt must come out whole.
 * Exit value: CHECK_* bits (0x1f when all pass); an exception exits with 0.
 */
#include "guest.h"

enum {
    CHECK_TIMER = 1 << 0,
    CHECK_THRE = 1 << 1,
    CHECK_RX = 1 << 2,
    CHECK_CLEAN = 1 << 3,
    CHECK_TX_IRQ = 1 << 4,
};

/* Sent one byte per THR-empty interrupt, as an interrupt-driven driver does. */
static const char tx_msg[] =
    "interrupt-driven transmit: the quick brown fox jumps over the lazy dog 0123456789 "
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG -- every byte of this line was written "
    "from the THRE interrupt handler.\n";

#define PIC1 0x20
#define PIC2 0xa0
#define PIT_HZ 1193182u
#define LAPIC_BASE 0xfee00000u
#define IOAPIC_BASE 0xfec00000u
#define PIC_VEC 0x20
#define APIC_TIMER_VEC 0x30
#define APIC_COM1_VEC 0x34
#define SPURIOUS_VEC 0xff

struct idt_gate {
    u16 off_lo, sel;
    u8 zero, type;
    u16 off_hi;
} __attribute__((packed));
_Static_assert(sizeof(struct idt_gate) == 8, "IDT gate layout");

extern const u32 isr_table[256];
void load_flat_gdt(void);

static struct idt_gate idt[256] __attribute__((aligned(8)));
static int use_apic;
static volatile u32 ticks, thre_irqs, rx_irqs, unexpected, spurious;
static volatile u32 rx_len, rx_done;
static volatile u32 tx_pos, tx_active, tx_irqs;
static volatile char rx_buf[64];

static void eoi(u32 vec)
{
    if (use_apic) {
        mmio_write32(LAPIC_BASE + 0xb0, 0);
    } else {
        if (vec >= PIC_VEC + 8)
            outb(PIC2, 0x20);
        outb(PIC1, 0x20);
    }
}

static void com1_irq(void)
{
    for (int i = 0; i < 32; i++) {
        u8 iir = inb(COM1 + 2);
        if (iir & 1)
            break;
        switch (iir & 0x0e) {
        case 0x02: /* THR empty */
            if (tx_active) {
                tx_irqs++;
                if (tx_msg[tx_pos]) {
                    outb(COM1, (u8)tx_msg[tx_pos++]);
                    break;
                }
                tx_active = 0;
            } else {
                thre_irqs++;
            }
            outb(COM1 + 1, inb(COM1 + 1) & ~2);
            break;
        case 0x04: /* received data */
        case 0x0c: /* character timeout */
            rx_irqs++;
            while (inb(COM1 + 5) & 1) {
                char c = (char)inb(COM1);
                if (c == '.')
                    rx_done = 1;
                else if (rx_len < sizeof(rx_buf) - 1)
                    rx_buf[rx_len++] = c;
            }
            break;
        case 0x06:
            inb(COM1 + 5);
            break;
        default:
            inb(COM1 + 6);
            break;
        }
    }
}

void irq_dispatch(u32 vec)
{
    if (vec < 32) {
        uart_puts("unexpected exception ");
        uart_putdec(vec);
        uart_putc('\n');
        debug_exit(0);
    }
    u32 timer = use_apic ? APIC_TIMER_VEC : PIC_VEC;
    u32 com1 = use_apic ? APIC_COM1_VEC : PIC_VEC + 4;
    if (vec == timer) {
        ticks++;
    } else if (vec == com1) {
        com1_irq();
    } else if (vec == SPURIOUS_VEC || (!use_apic && (vec == PIC_VEC + 7 || vec == PIC_VEC + 15))) {
        spurious++; /* spurious vectors take no EOI */
        return;
    } else {
        unexpected++;
    }
    eoi(vec);
}

static void setup_idt(void)
{
    for (int v = 0; v < 256; v++) {
        idt[v].off_lo = (u16)isr_table[v];
        idt[v].off_hi = (u16)(isr_table[v] >> 16);
        idt[v].sel = 0x08;
        idt[v].zero = 0;
        idt[v].type = 0x8e; /* present, DPL 0, 32-bit interrupt gate */
    }
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u32)(uptr)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

static void setup_pic(u8 mask1, u8 mask2)
{
    outb(PIC1, 0x11);
    outb(PIC2, 0x11);
    outb(PIC1 + 1, PIC_VEC);
    outb(PIC2 + 1, PIC_VEC + 8);
    outb(PIC1 + 1, 4);
    outb(PIC2 + 1, 2);
    outb(PIC1 + 1, 1);
    outb(PIC2 + 1, 1);
    outb(PIC1 + 1, mask1);
    outb(PIC2 + 1, mask2);
}

static void ioapic_route(u32 pin, u32 vector, u32 dest)
{
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin + 1);
    mmio_write32(IOAPIC_BASE + 0x10, dest << 24);
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * pin);
    mmio_write32(IOAPIC_BASE + 0x10, vector); /* fixed, physical, edge, active high, unmasked */
}

static void setup_pit(u32 hz)
{
    u32 div = PIT_HZ / hz;
    outb(0x43, 0x34); /* channel 0, lo/hi, mode 2 */
    outb(0x40, (u8)div);
    outb(0x40, (u8)(div >> 8));
}

static u8 rtc_seconds(void)
{
    outb(0x70, 0x00);
    return inb(0x71);
}

/* Spin (interrupts on) until cond() holds or `secs` RTC second ticks went by. */
static int wait_for(int (*cond)(void), int secs)
{
    u8 last = rtc_seconds();
    int seen = 0;
    for (;;) {
        for (int i = 0; i < 2000; i++) {
            if (cond())
                return 1;
            cpu_relax();
        }
        u8 now = rtc_seconds();
        if (now != last) {
            last = now;
            if (++seen > secs)
                return cond();
        }
    }
}

static int enough_ticks(void) { return ticks >= 10; }
static int got_thre(void) { return thre_irqs > 0; }
static int got_rx(void) { return rx_done; }
static int tx_finished(void) { return !tx_active; }

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    const char *cmdline = (mbi[0] & 4) && mbi[4] ? (const char *)(uptr)mbi[4] : "";
    use_apic = cmdline_get_num(cmdline, "apic", 0) != 0;
    u32 ok = 0;

    uart_init();
    uart_puts(use_apic ? "irq guest (ioapic)\n" : "irq guest (pic)\n");
    load_flat_gdt();
    setup_idt();
    if (use_apic) {
        setup_pic(0xff, 0xff);
        u32 bsp = mmio_read32(LAPIC_BASE + 0x20) >> 24;
        mmio_write32(LAPIC_BASE + 0xf0, 0x100 | SPURIOUS_VEC); /* software enable */
        mmio_write32(LAPIC_BASE + 0x80, 0);                    /* TPR: accept all */
        /* MP table: ISA IRQ0 -> pin 2 ("timerpin=" overrides, for diagnosis). */
        u32 timer_pin = (u32)cmdline_get_num(cmdline, "timerpin", 2);
        report_dec("timer_pin", timer_pin);
        ioapic_route(timer_pin & 23, APIC_TIMER_VEC, bsp);
        ioapic_route(4, APIC_COM1_VEC, bsp);
    } else {
        setup_pic((u8) ~((1 << 0) | (1 << 2) | (1 << 4)), 0xff);
    }
    outb(COM1 + 4, 0x0b); /* DTR | RTS | OUT2 (OUT2 gates the IRQ line on a PC) */
    setup_pit(100);
    __asm__ volatile("sti");

    if (wait_for(enough_ticks, 3))
        ok |= CHECK_TIMER;
    outb(COM1 + 1, 0x02); /* THR-empty interrupt: fires at once, the THR is empty */
    if (wait_for(got_thre, 2))
        ok |= CHECK_THRE;
    uart_puts("send input\n");
    outb(COM1 + 1, 0x01); /* received-data interrupt */
    if (wait_for(got_rx, 5) && rx_len == 4 && memcmp((const void *)rx_buf, "ping", 4) == 0)
        ok |= CHECK_RX;
    /* Interrupt-driven transmit: THRE must fire again after every byte written. */
    tx_pos = 0;
    tx_active = 1;
    outb(COM1 + 1, 0x03);
    if (wait_for(tx_finished, 5) && tx_msg[tx_pos] == 0)
        ok |= CHECK_TX_IRQ;
    __asm__ volatile("cli");
    outb(COM1 + 1, 0x00);
    report_dec("tx_irqs", tx_irqs);
    if (unexpected == 0)
        ok |= CHECK_CLEAN;
    rx_buf[rx_len] = 0;
    report_dec("ticks", ticks);
    report_dec("thre_irqs", thre_irqs);
    report_dec("rx_irqs", rx_irqs);
    report_str("rx", (const char *)rx_buf);
    report_dec("spurious", spurious);
    report_dec("unexpected", unexpected);
    report_hex("result", ok);
    debug_exit((u8)ok);
}
