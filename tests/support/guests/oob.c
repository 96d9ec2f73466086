/*
 * Out-of-bounds test guest (multiboot, 32-bit): makes the VMM's device models
 * touch guest-physical addresses outside RAM and checks that the machine keeps
 * running and reports errors the way real hardware / QEMU would.
 *
 *  - string I/O (rep insb / rep outsb) whose buffer crosses the end of RAM
 *  - MMIO loads and stores to unassigned addresses
 *  - fw_cfg DMA aimed past the end of RAM, across 4 GiB, at a 64-bit address,
 *    and with the DMA descriptor itself outside RAM
 *
 * The end of RAM comes from "mem=<MiB>" on the command line.  The exit value
 * is a bit mask of CHECK_* that passed: 0x7f means everything survived and
 * every DMA error was reported with the error bit.
 */
#include "guest.h"

enum {
    CHECK_INSB = 1 << 0,      /* rep insb across the end of RAM: RAM part written, count done */
    CHECK_OUTSB = 1 << 1,     /* rep outsb across the end of RAM completed */
    CHECK_MMIO = 1 << 2,      /* loads/stores to unassigned MMIO returned */
    CHECK_DMA_OK = 1 << 3,    /* a valid fw_cfg DMA read works */
    CHECK_DMA_END = 1 << 4,   /* DMA across the end of RAM -> error bit */
    CHECK_DMA_HIGH = 1 << 5,  /* DMA across 4 GiB and to a 64-bit address -> error bit */
    CHECK_DMA_DESC = 1 << 6,  /* descriptor outside RAM tolerated; DMA still works after */
};

#define DMA_CTL_ERROR 0x01
#define DMA_CTL_READ 0x02
#define DMA_CTL_SELECT 0x08

struct fw_cfg_dma {
    u32 control, length;
    u64 address;
} __attribute__((packed));
_Static_assert(sizeof(struct fw_cfg_dma) == 16, "fw_cfg DMA descriptor layout");

static struct fw_cfg_dma desc __attribute__((aligned(16)));
static u8 buf[64];

static u32 be32(u32 v) { return (v >> 24) | ((v >> 8) & 0xff00) | ((v << 8) & 0xff0000) | (v << 24); }
static u64 be64(u64 v) { return ((u64)be32((u32)v) << 32) | be32((u32)(v >> 32)); }

static void dma_kick(u64 desc_addr)
{
    outl(FW_CFG_DMA_HI, be32((u32)(desc_addr >> 32)));
    outl(FW_CFG_DMA_LO, be32((u32)desc_addr));
}

/* DMA-read `len` bytes of item `key` to `addr`; returns the final control word. */
static u32 dma_read(u16 key, u64 addr, u32 len)
{
    desc.control = be32(((u32)key << 16) | DMA_CTL_SELECT | DMA_CTL_READ);
    desc.length = be32(len);
    desc.address = be64(addr);
    dma_kick((uptr)&desc);
    u32 ctl = 0;
    for (int i = 0; i < 10000; i++) {
        ctl = be32(*(volatile u32 *)&desc.control);
        if (ctl == 0 || (ctl & DMA_CTL_ERROR))
            break;
        cpu_relax();
    }
    return ctl;
}

static void report_ctl(const char *what, u32 ctl)
{
    uart_puts(what);
    uart_puts(" control=");
    uart_puthex(ctl);
    uart_putc('\n');
}

static u32 check_string_io(uptr end)
{
    u32 ok = 0;
    volatile u8 *tail = (volatile u8 *)(end - 8);
    for (int i = 0; i < 8; i++)
        tail[i] = 0xaa;
    uptr edi = end - 8, ecx = 16;
    /* LCR reads back 0x03 after uart_init: a known byte from a harmless port. */
    __asm__ volatile("rep insb" : "+D"(edi), "+c"(ecx) : "d"(COM1 + 3) : "memory");
    int filled = 1;
    for (int i = 0; i < 8; i++)
        filled &= tail[i] == 0x03;
    report_hex("insb_ecx", ecx);
    report_hex("insb_tail", tail[0]);
    if (ecx == 0 && filled)
        ok |= CHECK_INSB;

    uptr esi = end - 8;
    ecx = 16;
    __asm__ volatile("rep outsb" : "+S"(esi), "+c"(ecx) : "d"(0x80) : "memory");
    report_hex("outsb_ecx", ecx);
    if (ecx == 0)
        ok |= CHECK_OUTSB;
    return ok;
}

static u32 check_mmio(void)
{
    static const uptr holes[] = {0xd0000000u, 0xe0001000u, 0xfebff000u};
    for (unsigned i = 0; i < sizeof(holes) / sizeof(holes[0]); i++) {
        mmio_write32(holes[i], 0x12345678);
        u32 v = mmio_read32(holes[i]);
        uart_puts("mmio ");
        uart_puthex(holes[i]);
        uart_puts(" reads ");
        uart_puthex(v);
        uart_putc('\n');
    }
    return CHECK_MMIO;
}

static u32 check_dma(uptr end)
{
    u32 ok = 0, ctl;
    u32 id = fw_cfg_read_u32(FW_CFG_ID);
    report_hex("fw_cfg_id", id);
    if (!(id & 2))
        return 0;

    memset(buf, 0, sizeof(buf));
    ctl = dma_read(FW_CFG_SIGNATURE, (uptr)buf, 4);
    report_ctl("dma_ok", ctl);
    if (ctl == 0 && memcmp(buf, "QEMU", 4) == 0)
        ok |= CHECK_DMA_OK;

    ctl = dma_read(FW_CFG_SIGNATURE, end - 2, 4);
    report_ctl("dma_end", ctl);
    if (ctl & DMA_CTL_ERROR)
        ok |= CHECK_DMA_END;

    u32 c1 = dma_read(FW_CFG_SIGNATURE, 0xfffffffeull, 4);
    u32 c2 = dma_read(FW_CFG_SIGNATURE, 0xfffffffffffff000ull, 0x2000);
    report_ctl("dma_4g", c1);
    report_ctl("dma_64bit", c2);
    if ((c1 & DMA_CTL_ERROR) && (c2 & DMA_CTL_ERROR))
        ok |= CHECK_DMA_HIGH;

    /* Descriptor outside RAM, then straddling the end of RAM: nothing to observe but survival. */
    dma_kick(0xd0000000u);
    dma_kick(end - 8);
    dma_kick(0xfffffffffffffff8ull);
    memset(buf, 0, sizeof(buf));
    ctl = dma_read(FW_CFG_SIGNATURE, (uptr)buf, 4);
    report_ctl("dma_after", ctl);
    if (ctl == 0 && memcmp(buf, "QEMU", 4) == 0)
        ok |= CHECK_DMA_DESC;
    return ok;
}

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    const char *cmdline = (mbi[0] & 4) && mbi[4] ? (const char *)(uptr)mbi[4] : "";
    uptr end = (uptr)(cmdline_get_num(cmdline, "mem", 128) << 20);
    u32 ok = 0;

    uart_init();
    uart_puts("oob guest\n");
    report_hex("ram_end", end);
    ok |= check_string_io(end);
    uart_puts("string io survived\n");
    ok |= check_mmio();
    uart_puts("mmio survived\n");
    ok |= check_dma(end);
    uart_puts("dma survived\n");
    report_hex("result", ok);
    debug_exit((u8)ok);
}
