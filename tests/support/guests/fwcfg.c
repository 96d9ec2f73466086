/*
 * fw_cfg behaviour test guest (multiboot, 32-bit): the corners of QEMU's
 * fw_cfg interface that firmware (SeaBIOS, OVMF) and Linux's qemu_fw_cfg
 * driver rely on, checked through both the I/O-port and the DMA interface.
 *
 * Exit value: CHECK_* bits, 0x7f when all pass.
 */
#include "guest.h"

enum {
    CHECK_ID = 1 << 0,          /* signature "QEMU", ID has traditional + DMA bits */
    CHECK_FILE_DIR = 1 << 1,    /* FILE_DIR readable: big-endian count, 64-byte entries, sane names */
    CHECK_PAST_END = 1 << 2,    /* port reads past an item's end return 0 */
    CHECK_BAD_KEY = 1 << 3,     /* an unused key reads as 0 */
    CHECK_DMA_SKIP = 1 << 4,    /* DMA select+skip 2, then read 2 -> "MU" */
    CHECK_DMA_WRITE_RO = 1 << 5, /* DMA write to a read-only item -> error bit */
    CHECK_DMA_ZERO_FILL = 1 << 6, /* DMA read past the end zero-fills, no error */
};

#define FW_CFG_FILE_DIR 0x19
#define DMA_CTL_ERROR 0x01
#define DMA_CTL_READ 0x02
#define DMA_CTL_SKIP 0x04
#define DMA_CTL_SELECT 0x08
#define DMA_CTL_WRITE 0x10

struct fw_cfg_dma {
    u32 control, length;
    u64 address;
} __attribute__((packed));
_Static_assert(sizeof(struct fw_cfg_dma) == 16, "fw_cfg DMA descriptor layout");

static struct fw_cfg_dma desc __attribute__((aligned(16)));
static u8 buf[64];

static u32 be32(u32 v) { return (v >> 24) | ((v >> 8) & 0xff00) | ((v << 8) & 0xff0000) | (v << 24); }
static u16 be16(u16 v) { return (u16)((v >> 8) | (v << 8)); }

static u32 dma(u32 control, u32 len, void *addr)
{
    desc.control = be32(control);
    desc.length = be32(len);
    desc.address = (u64)be32((u32)(uptr)addr) << 32; /* big-endian 64-bit, high half is 0 */
    outl(FW_CFG_DMA_HI, 0);
    outl(FW_CFG_DMA_LO, be32((u32)(uptr)&desc));
    u32 ctl = 0;
    for (int i = 0; i < 10000; i++) {
        ctl = be32(*(volatile u32 *)&desc.control);
        if (ctl == 0 || (ctl & DMA_CTL_ERROR))
            break;
        cpu_relax();
    }
    return ctl;
}

static int check_file_dir(void)
{
    u32 count;
    fw_cfg_select(FW_CFG_FILE_DIR);
    fw_cfg_read(&count, 4);
    count = be32(count);
    report_dec("files", count);
    if (count > 4096)
        return 0;
    for (u32 i = 0; i < count; i++) {
        struct {
            u32 size;
            u16 select, reserved;
            char name[56];
        } __attribute__((packed)) f;
        fw_cfg_read(&f, sizeof(f));
        f.name[55] = 0;
        if (be16(f.select) < 0x20 || !f.name[0])
            return 0;
        uart_puts("file ");
        uart_puts(f.name);
        uart_puts(" size=");
        uart_putdec(be32(f.size));
        uart_putc('\n');
    }
    return 1;
}

void guest_main(u32 magic, const u32 *mbi)
{
    (void)magic;
    (void)mbi;
    u32 ok = 0, ctl;
    uart_init();
    uart_puts("fwcfg guest\n");

    u32 id = fw_cfg_read_u32(FW_CFG_ID);
    report_hex("id", id);
    if (fw_cfg_present() && (id & 3) == 3)
        ok |= CHECK_ID;
    if (check_file_dir())
        ok |= CHECK_FILE_DIR;

    u8 sig[8];
    fw_cfg_select(FW_CFG_SIGNATURE);
    fw_cfg_read(sig, 8);
    if (memcmp(sig, "QEMU\0\0\0\0", 8) == 0)
        ok |= CHECK_PAST_END;

    u8 junk[4] = {1, 1, 1, 1};
    fw_cfg_select(0x4fff);
    fw_cfg_read(junk, 4);
    if (!junk[0] && !junk[1] && !junk[2] && !junk[3])
        ok |= CHECK_BAD_KEY;

    memset(buf, 0xaa, sizeof(buf));
    u32 c1 = dma(((u32)FW_CFG_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP, 2, buf);
    u32 c2 = dma(DMA_CTL_READ, 2, buf);
    report_hex("dma_skip", c1);
    report_hex("dma_read_after_skip", c2);
    if (c1 == 0 && c2 == 0 && buf[0] == 'M' && buf[1] == 'U' && buf[2] == 0xaa)
        ok |= CHECK_DMA_SKIP;

    memcpy(buf, "EVIL", 4);
    ctl = dma(((u32)FW_CFG_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 4, buf);
    report_hex("dma_write", ctl);
    int unchanged = fw_cfg_present();
    if ((ctl & DMA_CTL_ERROR) && unchanged)
        ok |= CHECK_DMA_WRITE_RO;

    memset(buf, 0xaa, sizeof(buf));
    ctl = dma(((u32)FW_CFG_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 8, buf);
    report_hex("dma_read_past_end", ctl);
    if (ctl == 0 && memcmp(buf, "QEMU\0\0\0\0", 8) == 0 && buf[8] == 0xaa)
        ok |= CHECK_DMA_ZERO_FILL;

    report_hex("result", ok);
    debug_exit((u8)ok);
}
