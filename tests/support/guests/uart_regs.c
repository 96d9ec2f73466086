/*
 * UART register test guest (multiboot, 32-bit): the 16550A behaviour that
 * OS drivers probe before they trust a serial port (Linux's 8250 autoconfig
 * does most of these), all done by polling.
 *
 * Exit value: CHECK_* bits, 0x7f when all pass.  Loopback bytes ('#') must
 * never reach the back-end, which the test checks on the serial output.
 */
#include "guest.h"

enum {
    CHECK_SCRATCH = 1 << 0,  /* scratch register holds what was written */
    CHECK_DIVISOR = 1 << 1,  /* DLAB: divisor latch reads back; LCR reads back */
    CHECK_LOOPBACK = 1 << 2, /* MCR loopback: a THR byte comes back in RBR */
    CHECK_MSR = 1 << 3,      /* loopback modem lines: DTR->DSR RTS->CTS OUT1->RI OUT2->DCD */
    CHECK_FIFO_ID = 1 << 4,  /* IIR bits 7:6 = 11 with FIFOs on, 00 with them off */
    CHECK_LSR_IDLE = 1 << 5, /* LSR THRE|TEMT when idle, DR clear */
    CHECK_FIFO_16 = 1 << 6,  /* 16 bytes through the loopback FIFO, in order */
};

#define RBR 0
#define IER 1
#define IIR 2
#define FCR 2
#define LCR 3
#define MCR 4
#define LSR 5
#define MSR 6
#define SCR 7

static u8 rd(u16 r) { return inb(COM1 + r); }
static void wr(u16 r, u8 v) { outb(COM1 + r, v); }

static int wait_dr(void)
{
    /* Loopback data is there at once; the bound only matters when the FIFO is empty (each read exits). */
    for (int i = 0; i < 200; i++)
        if (rd(LSR) & 1)
            return 1;
    return 0;
}

static void drain(void)
{
    for (int i = 0; i < 64 && (rd(LSR) & 1); i++)
        rd(RBR);
}

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    (void)mbi;
    u32 ok = 0;
    uart_init();
    uart_puts("uart_regs guest\n");

    wr(SCR, 0x5a);
    u8 s1 = rd(SCR);
    wr(SCR, 0xa5);
    u8 s2 = rd(SCR);
    if (s1 == 0x5a && s2 == 0xa5)
        ok |= CHECK_SCRATCH;

    wr(LCR, 0x83);
    wr(0, 0x0c);
    wr(1, 0x00);
    u8 dll = rd(0), dlm = rd(1);
    wr(LCR, 0x03);
    u8 lcr = rd(LCR);
    wr(LCR, 0x83);
    wr(0, 0x01); /* back to 115200 */
    wr(LCR, 0x03);
    report_hex("dll", dll);
    report_hex("lcr", lcr);
    if (dll == 0x0c && dlm == 0 && lcr == 0x03)
        ok |= CHECK_DIVISOR;

    u8 lsr = rd(LSR);
    report_hex("lsr_idle", lsr);
    if ((lsr & 0x61) == 0x60)
        ok |= CHECK_LSR_IDLE;

    wr(FCR, 0x07);
    u8 iir_fifo = rd(IIR);
    wr(FCR, 0x00);
    u8 iir_nofifo = rd(IIR);
    report_hex("iir_fifo", iir_fifo);
    report_hex("iir_nofifo", iir_nofifo);
    if ((iir_fifo & 0xc0) == 0xc0 && (iir_nofifo & 0xc0) == 0)
        ok |= CHECK_FIFO_ID;

    /* Loopback: nothing may leave the port, input is disconnected. */
    wr(MCR, 0x10);
    drain();
    wr(RBR, '#');
    int got = wait_dr();
    u8 back = got ? rd(RBR) : 0;
    if (got && back == '#')
        ok |= CHECK_LOOPBACK;

    wr(MCR, 0x1a);
    u8 msr1 = rd(MSR) & 0xf0;
    wr(MCR, 0x1f);
    u8 msr2 = rd(MSR) & 0xf0;
    wr(MCR, 0x10);
    u8 msr3 = rd(MSR) & 0xf0;
    if (msr1 == 0x90 && msr2 == 0xf0 && msr3 == 0x00)
        ok |= CHECK_MSR;

    wr(FCR, 0x07);
    drain();
    for (int i = 0; i < 16; i++) {
        for (int j = 0; j < 10000 && !(rd(LSR) & 0x20); j++)
            ;
        wr(RBR, (u8)('#'));
    }
    int in_order = 1, n = 0;
    while (n < 20 && wait_dr()) {
        if (rd(RBR) != '#')
            in_order = 0;
        n++;
    }
    if (n == 16 && in_order && !(rd(LSR) & 1))
        ok |= CHECK_FIFO_16;
    wr(FCR, 0x00);
    wr(MCR, 0x03);
    /* Only now, out of loopback, can the findings be printed. */
    report_hex("loop_byte", back);
    report_hex("msr_1a", msr1);
    report_hex("msr_1f", msr2);
    report_hex("msr_10", msr3);
    report_dec("fifo_count", (u64)n);

    report_hex("result", ok);
    debug_exit((u8)ok);
}
