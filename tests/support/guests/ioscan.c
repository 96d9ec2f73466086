/*
 * Bus robustness guest (multiboot, 32-bit): reads every legacy I/O port, does
 * word/dword reads that straddle device boundaries, and reads one word in
 * every 4 MiB between the end of RAM and 4 GiB.  The VMM must answer all of
 * them (unassigned = all ones) without dying.
 *
 * Nothing is written except to port 0x80, since writes to unknown ports can
 * legitimately reset or power off a PC.
 *
 * Exit value: bit 0 port scan done, bit 1 known-empty ports read as all ones
 * at every width, bit 2 straddling reads done, bit 3 MMIO scan done.
 */
#include "guest.h"

/* Ports no PC device of pyvmm or QEMU answers (COM2, LPT2, a random one). */
static const u16 empty_ports[] = {0x2f8, 0x278, 0x1234};
/* Word/dword reads that start inside one device and end outside it, or span two. */
/* (QEMU 7.2 itself aborts on the serial ones: hw/char/serial.c asserts size == 1.) */
static const u16 straddle[] = {0x3fe, 0x3ff, 0x3f7, 0x71, 0x6f, 0x510, 0x511, 0x50f,
                               0x5f, 0x63, 0xf3, 0xf7, 0x7f, 0x81, 0xfffe, 0xffff};

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    const char *cmdline = (mbi[0] & 4) && mbi[4] ? (const char *)(uptr)mbi[4] : "";
    u32 ram_end = (u32)(cmdline_get_num(cmdline, "mem", 128) << 20);
    u32 ok = 0, ones = 0;

    uart_init();
    uart_puts("ioscan guest\n");
    /* Every legacy port below 0x1000, then every 16th (PCI I/O space is mostly empty). */
    for (u32 port = 0; port <= 0xffff; port += port < 0x1000 ? 1 : 16) {
        if (port >= COM1 && port < COM1 + 8)
            continue; /* keep the console intact */
        if (inb((u16)port) == 0xff)
            ones++;
    }
    report_dec("ports_reading_ff", ones);
    ok |= 1;

    int empty = 1;
    for (unsigned i = 0; i < sizeof(empty_ports) / sizeof(empty_ports[0]); i++) {
        u16 p = empty_ports[i];
        if (inb(p) != 0xff || inw(p) != 0xffff || inl(p) != 0xffffffffu)
            empty = 0;
    }
    if (empty)
        ok |= 2;

    u32 mix = 0;
    for (unsigned i = 0; i < sizeof(straddle) / sizeof(straddle[0]); i++) {
        mix ^= inw(straddle[i]);
        mix ^= inl(straddle[i]);
    }
    report_hex("straddle_mix", mix);
    ok |= 4;

    u32 mmio_ones = 0, n = 0;
    for (u64 a = ((u64)ram_end + 0xfffff) & ~0xfffffull; a < 0x100000000ull; a += 0x400000) {
        if (mmio_read32((uptr)a + 0x1000) == 0xffffffffu)
            mmio_ones++;
        n++;
    }
    report_dec("mmio_probes", n);
    report_dec("mmio_reading_ones", mmio_ones);
    ok |= 8;
    outb(0x80, 0x55);
    report_hex("result", ok);
    debug_exit((u8)ok);
}
