/*
 * 64-bit Linux-boot-protocol test guest: checks the boot_params ("zero page")
 * the loader handed over in RSI.
 *
 * Expectations come from the command line ("pyvmm-test mem=<MiB> initrd=<bytes>"),
 * found through boot_params itself.  The exit value is a bit mask of passed
 * checks (CHECK_*); the serial summary shows the values behind them.
 */
#include "guest.h"

enum {
    CHECK_ZERO_PAGE = 1 << 0, /* header copied: "HdrS", version >= 2.12, boot_flag */
    CHECK_LOADER = 1 << 1,    /* type_of_loader == 0xff (undefined loader, as pyvmm is) */
    CHECK_CMDLINE = 1 << 2,   /* cmd_line_ptr -> string with the test token */
    CHECK_E820 = 1 << 3,      /* e820 table consistent with mem=; RAM above 4 GiB really there, no aliasing */
    CHECK_INITRD = 1 << 4,    /* ramdisk_image/size match the test's initrd, inside RAM */
    CHECK_LOAD = 1 << 5,      /* kernel loaded in RAM at an allowed address */
    CHECK_CPU = 1 << 6,       /* long mode, paging, interrupts off, CS=0x10/DS=0x18 in the GDT */
};

#define BP_E820_ENTRIES 0x1e8
#define BP_E820_TABLE 0x2d0
#define BP_BOOT_FLAG 0x1fe
#define BP_HEADER 0x202
#define BP_VERSION 0x206
#define BP_TYPE_OF_LOADER 0x210
#define BP_LOADFLAGS 0x211
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_KERNEL_ALIGNMENT 0x230
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define E820_MAX 128

struct e820_entry {
    u64 addr, size;
    u32 type;
} __attribute__((packed));
_Static_assert(sizeof(struct e820_entry) == 20, "e820 entry layout");

static const u8 *bp;
extern volatile u32 entered_via_32; /* bzimage.S: startup_32 ran before startup_64 */

static u8 bp8(u32 off) { return bp[off]; }
static u16 bp16(u32 off) { return *(const u16 *)(bp + off); }
static u32 bp32(u32 off) { return *(const u32 *)(bp + off); }

static const struct e820_entry *e820(u32 i) { return (const struct e820_entry *)(bp + BP_E820_TABLE) + i; }

/* Is [addr, addr+len) inside one usable (type 1) e820 range? */
static int in_ram(u64 addr, u64 len)
{
    u32 n = bp8(BP_E820_ENTRIES);
    for (u32 i = 0; i < n && i < E820_MAX; i++) {
        const struct e820_entry *e = e820(i);
        if (e->type == 1 && addr >= e->addr && addr + len <= e->addr + e->size)
            return 1;
    }
    return 0;
}

/* PC layout: RAM up to the 32-bit PCI hole at 3 GiB, the rest from 4 GiB up. */
#define PCI_HOLE 0xC0000000ull
#define HIGH_RAM 0x100000000ull

/*
 * Write distinct patterns at both ends of the RAM above 4 GiB and check they
 * read back and did not land in low RAM (a memory slot aliasing bug would).
 * Needs the boot page tables to map it: pyvmm's map at least 4 GiB + RAM.
 */
static int high_ram_works(u64 high)
{
    if (high == 0)
        return 1;
    volatile u64 *first = (volatile u64 *)(uptr)HIGH_RAM;
    volatile u64 *last = (volatile u64 *)(uptr)(HIGH_RAM + high - 8);
    volatile u64 *low_first = (volatile u64 *)(uptr)0x200000; /* below our image */
    u64 keep = *low_first;
    *first = 0x1111222233334444ull;
    *last = 0x5555666677778888ull;
    int ok = *first == 0x1111222233334444ull && *last == 0x5555666677778888ull && *low_first == keep;
    report_dec("high_ram_ok", (u64)ok);
    return ok;
}

static u32 check_e820(u64 mem)
{
    u32 n = bp8(BP_E820_ENTRIES);
    u64 low = mem < PCI_HOLE ? mem : PCI_HOLE, high = mem - low;
    int have_low = 0, have_high = 0, have_above_4g = high == 0, over = 0, unsorted = 0;
    u64 prev_end = 0;
    report_dec("e820_entries", n);
    if (n == 0 || n > E820_MAX)
        return 0;
    for (u32 i = 0; i < n; i++) {
        const struct e820_entry *e = e820(i);
        uart_puts("e820 ");
        uart_puthex(e->addr);
        uart_putc(' ');
        uart_puthex(e->size);
        uart_putc(' ');
        uart_putdec(e->type);
        uart_putc('\n');
        if (e->addr < prev_end)
            unsorted = 1;
        prev_end = e->addr + e->size;
        if (e->type != 1)
            continue;
        if (e->addr == 0 && e->size >= 0x80000)
            have_low = 1;
        if (e->addr <= 0x100000 && e->addr + e->size >= low - 0x100000 && e->addr + e->size <= low)
            have_high = 1;
        if (e->addr < HIGH_RAM && e->addr + e->size > low)
            over = 1;
        if (e->addr == HIGH_RAM && e->size == high)
            have_above_4g = 1;
        if (e->addr >= HIGH_RAM && e->addr + e->size > HIGH_RAM + high)
            over = 1;
    }
    return have_low && have_high && have_above_4g && !over && !unsorted && high_ram_works(high);
}

static u32 check_initrd(u64 want)
{
    u64 image = bp32(BP_RAMDISK_IMAGE) | ((u64)bp32(BP_EXT_RAMDISK_IMAGE) << 32);
    u64 size = bp32(BP_RAMDISK_SIZE) | ((u64)bp32(BP_EXT_RAMDISK_SIZE) << 32);
    report_hex("ramdisk_image", image);
    report_dec("ramdisk_size", size);
    if (want == 0)
        return size == 0;
    if (size != want || image == 0 || (image & 0xfff) || !in_ram(image, size))
        return 0;
    const u8 *p = (const u8 *)(uptr)image;
    u32 sum = 0, bad = 0;
    for (u64 i = 0; i < size; i++) {
        sum = sum * 31 + p[i];
        bad |= p[i] ^ initrd_pattern((u32)i);
    }
    report_hex("ramdisk_sum", sum);
    return !bad;
}

/* Boot protocol: __BOOT_CS (0x10) 64-bit code and __BOOT_DS (0x18) data, both in the loaded GDT. */
static int check_segments(void)
{
    u16 cs, ds, es, ss;
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) gdtr;
    __asm__ volatile("mov %%cs, %0; mov %%ds, %1; mov %%es, %2; mov %%ss, %3"
                     : "=r"(cs), "=r"(ds), "=r"(es), "=r"(ss));
    __asm__ volatile("sgdt %0" : "=m"(gdtr));
    report_hex("cs", cs);
    report_hex("ds", ds);
    report_hex("ss", ss);
    report_hex("gdt_base", gdtr.base);
    report_hex("gdt_limit", gdtr.limit);
    if (cs != 0x10 || ds != 0x18 || es != 0x18 || ss != 0x18 || gdtr.limit < 0x1f)
        return 0;
    const u64 *gdt = (const u64 *)(uptr)gdtr.base;
    u64 code = gdt[2], data = gdt[3];
    report_hex("gdt_cs", code);
    report_hex("gdt_ds", data);
    int code_ok = (code >> 47 & 1) && (code >> 44 & 1) && (code >> 43 & 1) && (code >> 53 & 1) && !(code >> 54 & 1);
    int data_ok = (data >> 47 & 1) && (data >> 44 & 1) && !(data >> 43 & 1) && (data >> 41 & 1);
    return code_ok && data_ok;
}

static u32 check_cpu(void)
{
    u64 cr0, cr4, rflags;
    u32 lo, hi;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("pushfq; popq %0" : "=r"(rflags));
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0xc0000080u));
    u64 efer = ((u64)hi << 32) | lo;
    report_hex("cr0", cr0);
    report_hex("cr4", cr4);
    report_hex("efer", efer);
    report_hex("rflags", rflags);
    return (cr0 & 0x80000001u) == 0x80000001u && (cr4 & 0x20) && (efer & 0x500) == 0x500 &&
           !(rflags & 0x200) && check_segments();
}

void linux64_main(const u8 *boot_params, uptr load_addr)
{
    u32 ok = 0;
    bp = boot_params;
    uart_init();
    uart_puts("linux64 guest\n");
    report_hex("boot_params", (uptr)bp);
    report_hex("load_addr", load_addr);
    report_dec("entry", entered_via_32 ? 32 : 64);
    if (bp && memcmp(bp + BP_HEADER, "HdrS", 4) == 0 && bp16(BP_VERSION) >= 0x020c &&
        bp16(BP_BOOT_FLAG) == 0xaa55)
        ok |= CHECK_ZERO_PAGE;
    report_hex("version", bp16(BP_VERSION));
    report_hex("type_of_loader", bp8(BP_TYPE_OF_LOADER));
    report_hex("loadflags", bp8(BP_LOADFLAGS));
    if (bp8(BP_TYPE_OF_LOADER) == 0xff)
        ok |= CHECK_LOADER;

    u64 cl = bp32(BP_CMD_LINE_PTR) | ((u64)bp32(BP_EXT_CMD_LINE_PTR) << 32);
    const char *cmdline = cl ? (const char *)(uptr)cl : "";
    report_hex("cmd_line_ptr", cl);
    report_str("cmdline", cmdline);
    if (cl && strstr(cmdline, "pyvmm-test"))
        ok |= CHECK_CMDLINE;
    u64 mem = cmdline_get_num(cmdline, "mem", 128) << 20;
    u64 initrd = cmdline_get_num(cmdline, "initrd", 0);

    if (check_e820(mem))
        ok |= CHECK_E820;
    if (check_initrd(initrd))
        ok |= CHECK_INITRD;
    u32 align = bp32(BP_KERNEL_ALIGNMENT);
    if (load_addr >= 0x100000 && (load_addr == 0x100000 || (align && load_addr % align == 0)) &&
        in_ram(load_addr, 0x1000) && (bp8(BP_LOADFLAGS) & 1))
        ok |= CHECK_LOAD;
    if (check_cpu())
        ok |= CHECK_CPU;
    report_hex("result", ok);
    debug_exit((u8)ok);
}
